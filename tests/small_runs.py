"""A very small training setup shared by the resume, refusal, NaN, DDP and plot tests (a few seconds per run)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from captioner.config import load_config

from conftest import TINY

# 60 synthetic images -> 48 train images, 144 captions: 9 steps of 16 per epoch at 64x64 (a 2x2 grid).
SMALL = ["dataset.synthetic_images=60", "train.num_workers=0", "compute.num_workers=0", "encoder.image_size=64",
         "model.embed_dim=32", "model.attention_dim=32", "model.decoder_dim=32", "train.batch_size=16", "train.epochs=2",
         "train.log_every=1", "train.checkpoint_every=3", "decode.batch_size=16"]


def small_overrides(data_root, *extra) -> list[str]:
    return [f"dataset.root={data_root}", *SMALL, *extra]


def small_config(data_root, *extra):
    return load_config(TINY, small_overrides(data_root, *extra))


def step_losses(run_dir) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]




def killed_child(step: int, logger: str = "MetricsLog", flush: bool = False) -> str:
    """Python source of a child process that trains through the real CLI (argv: threads, then CLI arguments) and
    SIGKILLs itself right after `logger` (a class of engine/train/loggers.py) has written step `step`'s line,
    flushed to disk first when asked: a kill -9 at a known point, past the last checkpoint."""
    return textwrap.dedent(f"""
        import os, signal, sys
        import torch
        torch.set_num_threads(int(sys.argv[1]))
        from captioner.cli import main
        from captioner.engine.train.loggers import {logger} as Logger
        write = Logger.write
        def write_then_die(self, record):
            write(self, record)
            if record.get("step") == {step} and "loss" in record:
                {"self.flush()" if flush else "pass"}
                os.kill(os.getpid(), signal.SIGKILL)
        Logger.write = write_then_die
        sys.exit(main(sys.argv[2:]))
    """)
