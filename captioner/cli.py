"""The `captioner` command: argument parsing, printing and exit codes; the work happens in the job modules.

Exit codes: 0 done, 2 bad input (one line on stderr: what is wrong and what to try), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from captioner import __version__
from captioner.errors import CaptionerError

OVERRIDES_HELP = "config overrides as section.key=value, e.g. train.epochs=3 encoder.layer=layer3"


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attention LSTM image captioning on a frozen, hooked torchvision CNN.",
        epilog="start with `captioner demo`; every command has --help")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help, doc):
        return sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("demo", "generate synthetic data, train, evaluate and caption in a few CPU minutes",
                "Runs the whole pipeline on synthetic shapes (configs/tiny.yaml, ResNet-18 for speed).\n"
                "The last line printed is a JSON summary with bleu4, checkpoint and output_dir.")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: ./demo)")
    _add_device(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    p = command("train", "train a captioner from a YAML config",
                "example: captioner train --config configs/tiny.yaml --run-dir runs/tiny train.epochs=3\n"
                "RUN_DIR receives best.pt, last.pt, metrics.jsonl, config.yaml and vocab.json.")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--run-dir", required=True, help="folder for checkpoints and logs")
    _add_device(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    p = command("evaluate", "caption a dataset split with a checkpoint and score it",
                "example: captioner evaluate --checkpoint runs/tiny/best.pt --split test --beam 3\n"
                "Writes results_SPLIT.json (COCO results format) and metrics_SPLIT.json next to the checkpoint\n"
                "or under --out. The dataset is the checkpoint's own; override it with dataset.key=value.")
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by `captioner train`")
    p.add_argument("--split", default="test", help="train, val or test (default: test)")
    p.add_argument("--beam", type=int, default=None, help="beam size; 1 is greedy (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the config's)")
    p.add_argument("--out", default=None, help="folder for results and metrics (default: the checkpoint's)")
    _add_device(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    p = command("caption", "caption image files or folders",
                "example: captioner caption --checkpoint runs/tiny/best.pt photos/ --out captions.jsonl\n"
                "One JSON line per image: {\"file\", \"caption\", \"score\"}, or {\"file\", \"error\"} for a bad file.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `captioner train`")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, or .txt files listing paths")
    p.add_argument("--out", default="captions.jsonl", help="output JSONL file (default: captions.jsonl)")
    p.add_argument("--beam", type=int, default=None, help="beam size; 1 is greedy (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--recursive", action="store_true", help="look into sub-folders too")
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes (default: 2)")
    _add_device(p)

    p = command("prepare", "check a dataset; write its vocabulary, split manifest and reference captions",
                "example: captioner prepare --config configs/coco_resnet152.yaml\n"
                "Reports images and captions per split, missing images, vocabulary size, <unk> rate and long\n"
                "captions; writes vocab.json, splits.json, captions_{val,test}.json and summary.json to --out.")
    p.add_argument("--config", required=True, help="YAML config file (its dataset section is used)")
    p.add_argument("--out", default=None, help="output folder (default: DATASET_ROOT/prepared)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    p = command("score", "score a COCO-format results file with coco-caption's metrics",
                "example: captioner score --results runs/coco/results_test.json \\\n"
                "             --annotations data/coco/annotations/captions_val2014.json --out metrics.json\n"
                "BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as coco-caption computes them (SPICE skipped), on the\n"
                "images in the results only; nltk corpus BLEU beside them. METEOR and the tokenizer need java.")
    p.add_argument("--results", required=True, help='[{"image_id": ..., "caption": ...}] JSON (evaluate writes one)')
    p.add_argument("--annotations", required=True,
                   help="COCO captions JSON (or a Karpathy/Flickr/CSV/JSONL captions file) holding the references")
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a java process: ~10 s)")

    p = command("layers", "list the hookable modules of a torchvision CNN with their output shapes",
                "example: captioner layers resnet152 --image-size 448\n"
                "Any name printed can be used as encoder.layer.")
    p.add_argument("arch", help="torchvision model name, e.g. resnet152")
    p.add_argument("--image-size", type=int, default=224, help="input size (default: 224)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default: 3)")
    return parser


def _print_json(data: dict) -> None:
    print(json.dumps(data), flush=True)


def run(args: argparse.Namespace) -> int:
    # Job modules are imported here, not at the top, so `captioner --help` stays instant.
    if args.command == "demo":
        from captioner import demo
        summary = demo.main(args.out, args.device, args.overrides)
        print(f"demo finished in {summary['seconds']}s: test BLEU-4 {summary['bleu4']:.3f} "
              f"(beam {summary['beam_size']}, {summary['test_images']} held-out images)")
        print(f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics_file']}\n"
              f"  captions:   {summary['captions_file']}")
        _print_json(summary)
    elif args.command == "train":
        from captioner import train
        from captioner.config import load_config
        cfg = load_config(args.config, args.overrides)
        _print_json(train.main(cfg, args.run_dir, args.device))
    elif args.command == "evaluate":
        from captioner import evaluate
        _print_json(evaluate.main(args.checkpoint, args.split, args.beam, args.out, args.overrides, args.device,
                                  args.batch_size))
    elif args.command == "caption":
        from captioner import caption
        if args.beam is not None and args.beam < 1:
            raise CaptionerError(f"--beam must be >= 1, got {args.beam}")
        _print_json(caption.main(args.checkpoint, args.paths, args.out, args.beam, args.batch_size, args.recursive,
                                 args.device, args.workers))
    elif args.command == "prepare":
        from captioner import prepare
        from captioner.config import load_config
        summary = prepare.main(load_config(args.config, args.overrides), args.out)
        print("\n".join(prepare.summary_lines(summary)), flush=True)
        _print_json(summary)
    elif args.command == "score":
        from captioner import score
        metrics = score.main(args.results, args.annotations, args.out, meteor=not args.no_meteor)
        print("\n".join(score.summary_lines(metrics)), flush=True)
        _print_json(metrics)
    elif args.command == "layers":
        from captioner.encoder import list_layers
        for name, kind, shape in list_layers(args.arch, args.image_size, args.in_channels):
            print(f"{name:<28} {kind:<20} {'x'.join(map(str, shape))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        return run(args)
    except CaptionerError as e:
        print(f"captioner {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"captioner {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
