#!/usr/bin/env python
"""Time one cross-entropy training step of the decoder, side by side in one process, and print JSON ratios.

    python scripts/bench_decoder_step.py                      # both sizes, 1 thread, 7 rounds
    python scripts/bench_decoder_step.py --sizes quality --rounds 11 --threads 2

Four variants of the step (forward, masked loss, backward, AdamW, through engine/step.py's TrainingStep) on
the same cached-feature batch, timed in interleaved rounds so that a shared machine's load hits all of them
alike; each variant's median is reported with its ratio to the old default:
    old_default_stepwise   model.features=project, teacher forcing one decoding step at a time (the code
                           before the training forward was optimised: what the old default cost)
    norm_stepwise          model.features=norm (the default) the same way
    project_fast           model.features=project through today's training forward
    norm_fast              the default through today's training forward (what `captioner train` runs)
Sizes: quality = scripts/bench_quality.py's (MobileNetV2 1280x7x7, dims 256, vocabulary 613, batch 64,
captions of 11 +- 4 words, as Flickr8k's); coco = `captioner bench`'s (ResNet 2048x7x7, dims 512, vocabulary
10,000, batch 32, 11 +- 3 words). Compare ratios only: absolute times depend on the machine's load.
With --threads 1 (the default) each step is timed in CPU seconds of the one thread that runs it, which other
processes' load leaves alone (caches and memory bandwidth aside); with more threads, in wall seconds.
--bf16 times each variant a second time under bf16 autocast (what compute.bf16=auto runs on a CPU with
AVX-512 BF16 or AMX, and on a GPU), its ratio still to the old default in float32 and to the old default
in bf16.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from captioner.config import Config, ModelConfig  # noqa: E402
from captioner.engine.train.step import CaptionLoss, TrainingStep, build_optimizer  # noqa: E402
from captioner.model.caption_model import CaptionModel  # noqa: E402
from captioner.model.decoder import caption_loss  # noqa: E402

SIZES = {  # channels, embed/attention/decoder size, vocabulary, batch, mean words, spread of words
    "quality": dict(channels=1280, dim=256, vocab=613, batch=64, words=11, spread=4, dropout=0.3),
    "coco": dict(channels=2048, dim=512, vocab=10000, batch=32, words=11, spread=3, dropout=0.5),
}
VARIANTS = ("old_default_stepwise", "norm_stepwise", "project_fast", "norm_fast")


class _Grid(torch.nn.Module):
    """A frozen encoder's description without the CNN: the step reads cached (B, C, 7, 7) features."""
    grid, image_size = (7, 7), 224

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels


class StepwiseLoss(CaptionLoss):
    """CaptionLoss over forward_stepwise: the teacher forcing the decoder had before it was optimised."""

    def forward(self, inputs, captions, lengths):
        captions = captions[:, : int(lengths.max())]
        logits, alphas = self.model.decoder.forward_stepwise(self.model.project(inputs), captions)
        loss, ce = caption_loss(logits, alphas, captions, lengths, self.model.alpha_c)
        return loss, ce, (lengths - 1).sum()


def batch(size: dict, seed: int = 0):
    """(features (B, C, 7, 7), captions (B, T+2), lengths (B,)) with words drawn around the mean length."""
    g = torch.Generator().manual_seed(seed)
    B = size["batch"]
    words = (torch.randn(B, generator=g) * size["spread"] + size["words"]).round().clamp(2, 30).long()
    lengths = words + 2  # <start> and <end>
    captions = torch.randint(4, size["vocab"], (B, int(lengths.max())), generator=g)
    captions[:, 0] = 1
    captions[torch.arange(B), lengths - 1] = 2
    captions[torch.arange(captions.shape[1])[None, :] >= lengths[:, None]] = 0
    features = torch.relu(torch.randn(B, size["channels"], 7, 7, generator=g))  # post-ReLU activations
    return features, captions, lengths


def make_step(variant: str, size: dict) -> TrainingStep:
    torch.manual_seed(0)
    features = "project" if variant.startswith(("old_default", "project")) else "norm"
    model_cfg = ModelConfig(size["dim"], size["dim"], size["dim"], dropout=size["dropout"], features=features)
    model = CaptionModel(None, model_cfg, size["vocab"], encoder=_Grid(size["channels"])).train()
    loss = StepwiseLoss(model) if variant.endswith("stepwise") else CaptionLoss(model)
    return TrainingStep(loss, build_optimizer(model, Config()), 5.0, torch.device("cpu"))


def time_sizes(name: str, rounds: int, bf16: bool, clock) -> dict:
    size = SIZES[name]
    data = batch(size)
    steps = {v: make_step(v, size) for v in VARIANTS}
    if bf16:
        for v in VARIANTS:
            steps[f"{v}_bf16"] = make_step(v, size)
            steps[f"{v}_bf16"].bf16 = True
    for step in steps.values():
        step(*data)  # warm-up
    seconds = {v: [] for v in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            tick = clock()
            step(*data)
            seconds[variant].append(clock() - tick)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    base = median["old_default_stepwise"]
    out = {"sizes": size, "median_s": {v: round(m, 4) for v, m in median.items()},
           "ratio_to_old_default": {v: round(m / base, 3) for v, m in median.items()},
           "norm_fast_vs_project_fast": round(median["norm_fast"] / median["project_fast"], 3),
           "norm_fast_speedup_over_norm_stepwise": round(median["norm_stepwise"] / median["norm_fast"], 3)}
    if bf16:
        out["bf16_ratio_to_old_default_bf16"] = {v: round(median[f"{v}_bf16"] / median["old_default_stepwise_bf16"], 3)
                                                 for v in VARIANTS}
        out["bf16_norm_fast_vs_project_fast"] = round(median["norm_fast_bf16"] / median["project_fast_bf16"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="quality,coco", help="comma-separated: quality, coco (default both)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds of every variant (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--bf16", action="store_true", help="also time every variant under bf16 autocast")
    args = p.parse_args(argv)
    names = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown or args.rounds < 1 or args.threads < 1:
        print(f"bench_decoder_step: error: --sizes takes {', '.join(SIZES)}; --rounds and --threads >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    results = {"threads": args.threads, "rounds": args.rounds, "bf16": args.bf16,
               "clock": "thread CPU seconds" if args.threads == 1 else "wall seconds",
               **{n: time_sizes(n, args.rounds, args.bf16, clock) for n in names}}
    print(json.dumps(results, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
