"""Shared fixtures: a small synthetic dataset and one tiny trained model, built once per test session."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from captioner.jobs import train
from captioner.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"

# One thread: on 2 cores shared with anything else, two threads per process oversubscribe and run 10x slower.
torch.set_num_threads(1)


def tiny_config(data_root, *overrides):
    """configs/tiny.yaml on a smaller synthetic set, for fast tests."""
    return load_config(TINY, [f"dataset.root={data_root}", "dataset.synthetic_images=1000", "train.num_workers=0",
                              "compute.num_workers=0",
                              *overrides])


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_root):
    """(summary, cfg) of a tiny model trained on synthetic shapes: the learning test and the CLI tests use it."""
    logging.getLogger("captioner").setLevel(logging.WARNING)
    cfg = tiny_config(synthetic_root, "train.epochs=12")
    run_dir = tmp_path_factory.mktemp("run")
    return train.main(train.TrainJob(cfg, run_dir, "cpu")), cfg


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A fresh folder per test module for tests/small_runs.py's small synthetic set."""
    return tmp_path_factory.mktemp("small-synthetic")


def noise_pngs(folder: Path, count: int, size: int, broken_jpeg: bool = False) -> Path:
    """folder/img000.png ... of random noise (seeded), plus a truncated broken.jpg when asked."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    if broken_jpeg:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    return folder
