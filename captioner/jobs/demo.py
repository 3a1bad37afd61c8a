"""The whole pipeline in one command, on CPU in a few minutes:

    captioner demo                 # everything under ./demo
    captioner demo --out /tmp/d    # or elsewhere
    captioner demo --print-config  # the config its training would use, as YAML; nothing run or written

generates the synthetic dataset, trains configs/tiny.yaml (ResNet-18 backbone for speed), evaluates the
best checkpoint on the held-out test split with beam search, and captions a folder of held-out images
(captions.jsonl, and gallery.html showing each word's attention map).
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from captioner.jobs import caption, evaluate, train
from captioner.config import Config, load_config, shipped_config
from captioner.data.datasets import by_split, load_records
from captioner.errors import CaptionerError
from captioner.files import check_writable
from captioner.engine.runtime.device import resolve_device

log = logging.getLogger("captioner")

TINY_CONFIG = shipped_config("tiny.yaml")  # inside the package (pip install .), or configs/ in a checkout


@dataclass
class DemoJob:
    """`captioner demo`'s options."""
    out: str = "demo"  # everything the demo writes goes under this folder
    device: str | None = "auto"
    overrides: list[str] = field(default_factory=list)  # section.key=value on top of configs/tiny.yaml

    def __post_init__(self):
        if TINY_CONFIG is None:
            raise CaptionerError("configs/tiny.yaml is missing from this installation: reinstall captioner")
        resolve_device(self.device)  # a device the machine lacks is refused before anything is announced


def demo_config(job: DemoJob) -> Config:
    """The config the demo trains with (and `captioner demo --print-config` prints): configs/tiny.yaml on the
    synthetic data under --out, 15 epochs, then the KEY=VALUE overrides."""
    out = Path(job.out).resolve()
    return load_config(TINY_CONFIG, [f"dataset.root={out / 'data'}", "train.epochs=15", *job.overrides])


def main(job: DemoJob) -> dict:
    start, device = time.perf_counter(), job.device
    out = Path(job.out).resolve()
    check_writable(out, "demo folder", folder=True)  # before minutes of training
    cfg = demo_config(job)
    log.info("demo: training %s %s on synthetic shapes under %s", cfg.encoder.arch, cfg.encoder.layer or "(last stage)", out)
    # overwrite: a rerun, maybe with other overrides, retrains
    summary = train.main(train.TrainJob(cfg, out / "run", device, overwrite=True))
    # compute.* overrides (compute.bf16=false) hold for all three steps, not only training.
    metrics = evaluate.main(evaluate.EvaluateJob(summary["best_checkpoint"], "test", out_dir=str(out / "eval"),
                                                 device=device, compute=cfg.compute))
    folder = out / "images"  # a plain folder of held-out images, as a user would have
    folder.mkdir(parents=True, exist_ok=True)
    for record in by_split(load_records(cfg.dataset), "test")[:16]:
        shutil.copyfile(record.path, folder / Path(record.path).name)  # a new file: the umask's mode, not the source's
    captions = caption.main(caption.CaptionJob(summary["best_checkpoint"], [str(folder)],
                                               out=str(out / "captions.jsonl"), device=device,
                                               html=str(out / "gallery.html"), overwrite=True,  # a new model: no resume
                                               compute=cfg.compute))
    return {"bleu1": metrics["bleu1"], "bleu4": metrics["bleu4"], "beam_size": metrics["beam_size"],
            "test_images": metrics["images"], "checkpoint": summary["best_checkpoint"], "output_dir": str(out),
            "metrics_file": metrics["metrics_file"], "captions_file": captions["out"],
            "gallery_file": captions["html"],
            "seconds": round(time.perf_counter() - start, 1)}
