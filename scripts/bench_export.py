"""Sizes of a checkpoint and of its exported model folders (float32 and bf16), printed as JSON.

    python scripts/bench_export.py demo/run/best.pt                 # any checkpoints (or model folders)
    python scripts/bench_export.py --resnet152                      # + a COCO-shaped ResNet-152 model

--resnet152 builds configs/coco_resnet152.yaml's model with random weights and a 10,000-word vocabulary, and
saves it as `captioner train` saves best.pt (the optimizer's state included, after one step), so the sizes
are those of a real COCO run without needing one. The folders go to a temporary folder and are deleted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from captioner.config import load_config, shipped_config, to_dict  # noqa: E402
from captioner.engine.infer.checkpoint import save_checkpoint  # noqa: E402
from captioner.engine.train.step import build_optimizer  # noqa: E402
from captioner.jobs.export import ExportJob, main as export  # noqa: E402
from captioner.model.caption_model import CaptionModel  # noqa: E402
from captioner.text import SPECIALS, Vocabulary  # noqa: E402


def resnet152_checkpoint(path: Path, words: int = 10_000) -> Path:
    """configs/coco_resnet152.yaml's model, random weights (encoder.weights null), saved with its optimizer."""
    cfg = load_config(shipped_config("coco_resnet152.yaml"), ["encoder.weights=null"])
    vocab = Vocabulary(SPECIALS + [f"w{i}" for i in range(words - len(SPECIALS))])
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab))
    optimizer = build_optimizer(model, cfg)
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's moments exist from the first step on, as in every saved checkpoint
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "config": to_dict(cfg), "vocab": vocab.tokens, "epoch": 1, "step": 1})
    return path


def sizes(checkpoint: Path, scratch: Path) -> dict:
    row = {"checkpoint": str(checkpoint), "checkpoint_mb": None}
    for dtype in ("float32", "bf16"):
        result = export(ExportJob(str(checkpoint), str(scratch / f"{checkpoint.stem}-{dtype}"), dtype=dtype,
                                  overwrite=True))
        row["checkpoint_mb"] = round(result["checkpoint_bytes"] / 1e6, 1)
        row[f"folder_{dtype}_mb"] = round(result["bytes"] / 1e6, 1)
        row[f"folder_{dtype}_ratio"] = round(result["bytes"] / result["checkpoint_bytes"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="checkpoints or model folders to export")
    parser.add_argument("--resnet152", action="store_true", help="also a random COCO-shaped ResNet-152 model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        checkpoints = [Path(c) for c in args.checkpoints]
        if args.resnet152:
            checkpoints.append(resnet152_checkpoint(scratch / "resnet152-coco.pt"))
        print(json.dumps({"models": [sizes(c, scratch) for c in checkpoints]}, indent=1))


if __name__ == "__main__":
    main()
