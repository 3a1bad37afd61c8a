"""`captioner`'s argument parser: every command, its options and its --help text (cli/__init__.py runs them)."""
from __future__ import annotations

import argparse

from captioner import __version__
from captioner.cli.overrides import CaptionerParser, CommandParser

CHECKPOINT_HELP = ("a best.pt/last.pt written by `captioner train`, a model folder written by `captioner export`, or "
                   "a Hugging Face Hub repo id owner/name (the [hub] extra)")
OVERRIDES_HELP = ("config overrides as section.key=value, e.g. train.epochs=3 decode.max_len=5, anywhere after the "
                  "command (before or after options; --set KEY=VALUE says the same). A word like a.b=c is read as an "
                  "override unless a file of that name exists")


def _add_device(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a sub-command's default must not hide a --device given before it (parse_known_args fills "auto").
    p.add_argument("--device", default=argparse.SUPPRESS,
                   help="cpu, cuda, cuda:N or auto (CUDA when available; default)")


def _add_overrides(p: argparse.ArgumentParser, help: str = OVERRIDES_HELP) -> None:
    """The positional KEY=VALUE config overrides and their --set alias (CaptionerParser gathers both, in order)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help)
    p.add_argument("--set", dest="set_overrides", action="append", metavar="KEY=VALUE",
                   help="the same as a positional KEY=VALUE (kept for older scripts); repeatable")


def _add_print_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (every key: the config file's or the checkpoint's "
                   "values, then the KEY=VALUE overrides and options, then the defaults) and exit without doing "
                   "any work or writing any file")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="what runs the model: torch (default), or onnxruntime: the ONNX graphs of a model folder "
                   "written by `captioner export --format onnx` (the [onnx] extra)")


def _providers(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _add_ort_options(p: argparse.ArgumentParser) -> None:
    """How ONNX Runtime runs the graphs (with --runtime onnxruntime)."""
    p.add_argument("--providers", type=_providers, default=None, metavar="P1,P2",
                   help="with --runtime onnxruntime: execution providers, best first, comma-separated (e.g. "
                   "CUDAExecutionProvider,CPUExecutionProvider; default: from --device)")
    p.add_argument("--ort-threads", type=int, default=None, metavar="N",
                   help="with --runtime onnxruntime: intra-op threads (default: torch's thread count)")
    p.add_argument("--ort-optimization", choices=["disable", "basic", "extended", "all"], default=None,
                   help="with --runtime onnxruntime: graph optimization level (default: all)")


def _add_generation(p: argparse.ArgumentParser, n_best: bool = True) -> None:
    """How captions are chosen: the decode.* keys as options (each also decode.KEY=VALUE), named as the Python
    API's keywords (Captioner.caption(beam_size=..., top_p=...)); default: the checkpoint's."""
    p.add_argument("--max-len", type=int, default=None, help="longest caption, in words (decode.max_len)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="beam ranking: 0 by total log-probability, 1 by mean per word (decode.length_penalty)")
    p.add_argument("--block-ngram", type=int, default=None,
                   help="no caption repeats one of its n-grams of this length; 0: off (decode.block_ngram)")
    p.add_argument("--suppress-unk", action="store_const", const=True, default=None,
                   help="never write <unk> (decode.suppress_unk)")
    p.add_argument("--sample", action="store_true",
                   help="draw each word from the model's distribution (varied captions) instead of greedy/beam")
    p.add_argument("--temperature", type=float, default=None,
                   help="with --sample: < 1 closer to greedy, > 1 more varied (default: decode.temperature, 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="with --sample: draw from the k likeliest words only; 0: off (decode.top_k)")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --sample: draw from the fewest likeliest words holding probability p (nucleus); "
                   "1: off (decode.top_p)")
    if n_best:
        p.add_argument("--num-return-sequences", type=int, default=None,
                       help="captions per image, best first: the n best beams (n <= --beam) or n samples; JSONL "
                       "records list them as sequences, CSV keeps the best (decode.num_return_sequences)")


def build_parser() -> argparse.ArgumentParser:
    parser = CaptionerParser(
        prog="captioner", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attention LSTM image captioning on a frozen, hooked backbone (torchvision, timm or open_clip).",
        epilog="start with `captioner demo`; every command has --help")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--device", default=argparse.SUPPRESS,
                        help="cpu, cuda, cuda:N or auto, for the commands that take it (also accepted after them)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)

    def command(name, help, doc):
        p = sub.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: without -q here, the one given before the sub-command (or False) stays.
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and errors on stderr")
        return p

    p = command("demo", "generate synthetic data, train, evaluate and caption in a few CPU minutes",
                "Runs the whole pipeline on synthetic shapes (configs/tiny.yaml, ResNet-18 for speed).\n"
                "The last line printed is a JSON summary with bleu4, checkpoint and output_dir.\n"
                "Ctrl-C/SIGTERM during training save OUT/run/last.pt and exit with 130/143; rerunning the same\n"
                "command resumes it. A folder holding a finished demo is refused unless --overwrite.")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: ./demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that holds a finished demo (deletes its run)")
    _add_print_config(p)
    _add_device(p)
    _add_overrides(p)

    p = command("train", "train a captioner from a YAML config, or resume a run",
                "example: captioner train --config configs/tiny.yaml --run-dir runs/tiny train.epochs=3\n"
                "         captioner train --resume runs/tiny         (after a kill, Ctrl-C or pre-emption)\n"
                "         captioner train --config FILE --run-dir runs/scst --init-from runs/tiny/best.pt "
                "train.objective=scst\n"
                "         torchrun --nproc_per_node=2 -m captioner train --config FILE --run-dir DIR\n"
                "         captioner train --resume runs/tiny 'train.log_to=[jsonl,tensorboard]'   "
                "(then: tensorboard --logdir runs)\n"
                "         captioner train --config FILE train.epochs=3 --print-config   (the resolved config; no run)\n"
                "RUN_DIR receives best.pt, last.pt, metrics.jsonl, config.yaml and vocab.json (and tb/ with\n"
                "train.log_to=[jsonl,tensorboard]). On a terminal one progress line covers the run, with its ETA.\n"
                "SIGINT/SIGTERM save last.pt and exit with 130/143; --resume continues at the exact sample.")
    p.add_argument("--config", help="YAML config file (see configs/); with --resume, checked against the run's")
    p.add_argument("--run-dir", help="folder for checkpoints and logs")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--init-from", metavar="CKPT", help="start a new run from CKPT's weights and vocabulary (fresh "
                   "optimizer and schedule): SCST after cross-entropy, or fine-tuning on another dataset")
    p.add_argument("--overwrite", action="store_true", help="start over in a --run-dir that holds another run")
    _add_print_config(p)
    _add_device(p)
    _add_overrides(p)

    p = command("evaluate", "caption a dataset split with a checkpoint and score it",
                "example: captioner evaluate --checkpoint runs/tiny/best.pt --split test --beam 3\n"
                "Writes results_SPLIT.json (COCO results format) and metrics_SPLIT.json next to the checkpoint\n"
                "or under --out. The dataset is the checkpoint's own; override it with dataset.key=value.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--split", default="test", help="train, val or test (default: test)")
    p.add_argument("--beam", dest="beam_size", type=int, default=None,
                   help="beam size; 1 is greedy (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the config's)")
    # One caption per image is scored: no --num-return-sequences (the n-best of `caption` has nothing to score).
    _add_generation(p, n_best=False)
    p.add_argument("--out", dest="out_dir", default=None,
                   help="folder for results and metrics (default: the checkpoint's)")
    _add_print_config(p)
    _add_device(p)
    _add_runtime(p)
    _add_ort_options(p)
    _add_overrides(p)

    p = command("caption", "caption image files or folders (batched, resumable, optional HTML attention gallery)",
                "example: captioner caption --checkpoint best.pt photos/ --out captions.jsonl --html gallery.html\n"
                "         captioner caption --checkpoint best.pt photos/ decode.max_len=12 compute.bf16=false\n"
                "         torchrun --nproc_per_node=8 -m captioner caption --checkpoint best.pt photos/ --out c.jsonl\n"
                "One record per image: {\"file\", \"caption\", \"score\"}, or {\"file\", \"error\"} for a file\n"
                "that cannot be read (the run goes on). Rerunning the same command resumes: images already\n"
                "in the output are skipped. Exit status: 0 done (even with error records), 1 with --strict\n"
                "when some image could not be read, 2 bad arguments, 130 interrupted (rerun to resume).")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders, .txt files listing paths (one per line), or - for paths on stdin")
    p.add_argument("--out", default=None,
                   help="output file (default: captions.jsonl, or captions.csv with --format csv)")
    p.add_argument("--format", dest="fmt", choices=["jsonl", "csv"], default=None,
                   help="output format (default: .csv is csv, else jsonl; an --out named for another format, such as "
                        ".json, .tsv, .gz or .html, is refused without --format)")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write a self-contained HTML gallery with per-word attention maps")
    p.add_argument("--beam", dest="beam_size", type=int, default=None,
                   help="beam size; 1 is greedy (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the checkpoint's)")
    p.add_argument("--recursive", action="store_true", help="look into sub-folders too")
    p.add_argument("--workers", dest="num_workers", type=int, default=2,
                   help="image decoding worker processes; 0 decodes in the main "
                   "process (default: 2)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any image could not be read")
    _add_overrides(p, "override the checkpoint's decode.* or compute.* settings, e.g. decode.max_len=5, "
                   "compute.bf16=false (float32 on a CPU where auto means bf16) or decode.block_ngram=3, anywhere "
                   "after the command; a path of this form is read as an override unless that file exists")
    p.add_argument("--overwrite", action="store_true", help="start the output (and gallery) again instead of resuming")
    p.add_argument("--retry-errors", action="store_true",
                   help="when resuming, try the images recorded as errors again instead of skipping them")
    _add_generation(p)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse larger images as likely decompression bombs (default: 100000000)")
    _add_print_config(p)
    _add_device(p)
    _add_runtime(p)
    _add_ort_options(p)

    p = command("serve", "serve a checkpoint over HTTP: JSON API and a web page, batched across requests",
                "example: captioner serve --checkpoint demo/run/best.pt     (then open http://127.0.0.1:8000)\n"
                "         curl -F image=@photo.jpg http://127.0.0.1:8000/v1/caption\n"
                "Binds to loopback (this machine only) unless --host names another address AND --allow-remote\n"
                "is given. --token (or $CAPTIONER_TOKEN) requires Authorization: Bearer on /v1/*. Needs the\n"
                "[serve] extra: pip install -e \".[serve]\". SIGTERM/Ctrl-C finish the requests in flight, then exit.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--allow-remote", action="store_true", help="confirm a --host other machines can reach")
    p.add_argument("--max-batch", type=int, default=32, help="most images captioned in one batch (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more images before it starts (default: 10)")
    p.add_argument("--queue", type=int, default=256,
                   help="images that may wait for the model; beyond, 503 + Retry-After (default: 256)")
    p.add_argument("--beam", dest="beam_size", type=int, default=None,
                   help="beam size; 1 is greedy (default: the checkpoint's)")
    p.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN (default: $CAPTIONER_TOKEN)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body in MiB (default: 32)")
    p.add_argument("--max-images", type=int, default=32, help="most images in one request (default: 32)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="refuse larger images as likely decompression bombs (default: 40000000)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait for captions (default: 60)")
    p.add_argument("--upload-timeout", type=float, default=60.0,
                   help="seconds a request's body may take to arrive; slower uploads get 408 (default: 60)")
    p.add_argument("--decode-threads", type=int, default=2, help="image decoding threads (default: 2)")
    _add_print_config(p)
    _add_device(p)
    _add_runtime(p)
    _add_ort_options(p)
    _add_overrides(p, OVERRIDES_HELP + "; decode.* and compute.* (compute.bf16=false)")

    p = command("export", "write a checkpoint as a model folder (safetensors, config.json, model card) to share",
                "example: captioner export --checkpoint runs/coco/best.pt --out model/\n"
                "         captioner export --checkpoint best.pt --out model/ --dtype bf16 --metrics metrics_test.json\n"
                "         captioner export --checkpoint best.pt --out model/ --push alice/captioner-coco\n"
                "         captioner export --checkpoint best.pt --out model-int8/ --format onnx --quantize int8\n"
                "The folder holds model.safetensors (every weight, backbone included), config.json, vocab.json and\n"
                "README.md (a model card). It loads without pickle: captioner caption/evaluate/serve --checkpoint\n"
                "model/, or Captioner.from_pretrained(\"model/\") in Python.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `captioner train` (or a model folder)")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                   help="weights' storage type: bf16 halves the folder, for inference (default: float32)")
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors",
                   help="what the folder holds besides config.json and the card: safetensors (default), or onnx: "
                   "also encoder.onnx, decoder_init.onnx, decoder_step.onnx for --runtime onnxruntime ([onnx] extra)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --format onnx: int8 graphs (static int8 encoder convolutions, calibrated; dynamic int8 "
                   "decoder matrix products): about 2x faster on a CPU where the int8 encoder meets --feature-budget; "
                   "else the encoder stays float32 and only the decoder is int8")
    p.add_argument("--calibrate", default=None, metavar="DIR",
                   help="with --quantize: images to calibrate on (default: the checkpoint's training split)")
    p.add_argument("--calibration-images", type=int, default=64, metavar="N",
                   help="with --quantize: how many images calibrate (default: 64)")
    p.add_argument("--feature-budget", type=float, default=None, metavar="COSINE",
                   help="with --quantize: the int8 encoder is kept only if its features reach this mean cosine to "
                   "float32's on held-out calibration images; else the encoder stays float32 and only the decoder "
                   "is int8 (default: 0.99, where average quality holds; 0.999 keeps most captions float32's; 0: "
                   "the int8 encoder whatever it measures)")
    p.add_argument("--onnx-only", action="store_true",
                   help="with --format onnx: leave model.safetensors out (a deployment folder that onnxruntime alone "
                   "runs: examples/onnx_caption.py, or --runtime onnxruntime)")
    p.add_argument("--metrics", default=None, metavar="FILE",
                   help="a metrics_SPLIT.json written by `captioner evaluate`: its scores go into the model card")
    p.add_argument("--license", default="unknown", metavar="ID",
                   help="the model's licence in the card, a Hub licence id such as mit or apache-2.0 (default: "
                   "unknown); the backbone weights' own licence is named where their library records it")
    p.add_argument("--push", default=None, metavar="OWNER/NAME",
                   help="also upload the folder to this Hugging Face Hub repo (needs the [hub] extra and a login)")
    p.add_argument("--private", action="store_true", help="with --push: create the repo as private")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")

    p = command("plot", "draw a run's loss and validation curves into a PNG, or overlay several runs",
                "example: captioner plot runs/tiny          (writes runs/tiny/curves.png)\n"
                "         captioner plot runs/a runs/b --out compare.png   (loss and selection metric of both,\n"
                "                                                           against steps and against time)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `captioner train`")
    p.add_argument("--out", default=None,
                   help="PNG file to write (default: RUN_DIR/curves.png for one run, ./compare.png for several)")

    p = command("extract", "run the frozen encoder once and cache its features on disk for training/evaluation",
                "example: captioner extract --config configs/tiny.yaml --split train,val\n"
                "         torchrun --nproc_per_node=8 -m captioner extract --config configs/coco_resnet152.yaml\n"
                "Writes cache.dir (default DATASET_ROOT/features/ARCH-LAYER-SIZE); resumes where it stopped.\n"
                "train and evaluate then read the features instead of running the CNN.")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--split", dest="splits", default="train,val,test",
                   help="comma-separated splits (default: train,val,test)")
    p.add_argument("--rebuild", action="store_true", help="replace a cache built with other encoder settings")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: compute.encode_batch_size)")
    p.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="image decoding processes (default: compute.num_workers)")
    _add_print_config(p)
    _add_device(p)
    _add_overrides(p)

    p = command("bench", "measure encoder, extraction, training and captioning throughput on synthetic images",
                "example: captioner bench --device cpu --json bench.json     (about a minute on 2 CPU cores)\n"
                "         captioner bench --device cuda --full               (ResNet-152, 640x480 JPEGs, COCO sizes)\n"
                "         captioner bench --device cpu --threads 1 --runtimes  (torch vs ONNX Runtime fp32 / int8)\n"
                "Prints a table; --json also writes the numbers with the device, versions and settings.")
    _add_device(p)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--full", dest="preset", action="store_const", const="full",
                       help="GPU sizes: ResNet-152 at 224, 640x480 JPEGs, COCO model, torch.compile, GPU decoding")
    sizes.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                       help="tiny sizes that only check the command works (seconds)")
    p.set_defaults(preset="default")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the results to FILE")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, default=None,
                   help="without torch.compile (--full turns it on)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and onnxruntime (default: torch's choice)")
    p.add_argument("--runtimes", action="store_true",
                   help="instead: PyTorch float32 against ONNX Runtime float32 and int8 (the [onnx] extra), "
                   "captioning JPEGs end to end and encoding, for each of runtime_archs (resnet152,resnet18)")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="change a size of the preset, e.g. arch=resnet152 image_size=448 train_batch=64")

    p = command("prepare", "check a dataset; write its vocabulary, split manifest and reference captions",
                "example: captioner prepare --config configs/coco_resnet152.yaml\n"
                "Reports images and captions per split, missing images, vocabulary size, <unk> rate and long\n"
                "captions; writes vocab.json, splits.json, captions_{val,test}.json and summary.json to --out.")
    p.add_argument("--config", required=True, help="YAML config file (its dataset section is used)")
    p.add_argument("--out", dest="out_dir", default=None,
                   help="output folder (default: DATASET_ROOT/prepared; with no dataset.root, beside the captions "
                        "file)")
    _add_overrides(p)

    p = command("score", "score a COCO-format results file with coco-caption's metrics",
                "example: captioner score --results runs/coco/results_test.json \\\n"
                "             --annotations data/coco/annotations/captions_val2014.json --out metrics.json\n"
                "BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as coco-caption computes them (SPICE skipped), on the\n"
                "images in the results only; nltk corpus BLEU beside them. METEOR and the tokenizer need java.")
    p.add_argument("--results", required=True, help='[{"image_id": ..., "caption": ...}] JSON (evaluate writes one)')
    p.add_argument("--annotations", required=True,
                   help="COCO captions JSON (or a Karpathy/Flickr/CSV/JSONL captions file) holding the references")
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    p.add_argument("--no-meteor", dest="meteor", action="store_false",
                   help="skip METEOR (it starts a java process: ~10 s)")

    p = command("layers", "list the hookable modules of a backbone with their output shapes and grids",
                "examples: captioner layers resnet152 --image-size 448\n"
                "          captioner layers timm/convnext_tiny --image-size 224\n"
                "          captioner layers open_clip/ViT-B-16 --image-size 224\n"
                "Any name printed can be used as encoder.layer (unset: the last stage the library reports); the\n"
                "last column is the (channels, height, width) grid hooking it gives (a transformer block's\n"
                "tokens without their class token, as the patch grid), '-' where the output is no grid (pooled\n"
                "vectors, logits). Random weights: no download.")
    p.add_argument("arch", help="torchvision name (resnet152), timm/NAME (timm/convnext_tiny) or open_clip/NAME "
                                "(open_clip/ViT-B-16)")
    p.add_argument("--image-size", type=int, default=224, help="input size (default: 224)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default: 3)")

    p = command("completion", "print a shell completion script: commands, options, config keys ([completion] extra)",
                "example: captioner completion bash > ~/.local/share/bash-completion/completions/captioner\n"
                "         captioner completion zsh > ~/.zfunc/_captioner    (fpath=(~/.zfunc $fpath) in ~/.zshrc)\n"
                "Generated by shtab from this parser, so it always matches this version's commands and options;\n"
                "KEY=VALUE positions complete the config's keys (decode.max_len=, train.epochs=, ...).")
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell to complete in")
    return parser
