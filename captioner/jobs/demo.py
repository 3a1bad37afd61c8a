"""The whole pipeline in one command, on CPU in a few minutes:

    captioner demo                 # everything under ./demo
    captioner demo --out /tmp/d    # or elsewhere
    captioner demo --print-config  # the config its training would use, as YAML; nothing run or written
    captioner demo --overwrite     # start over in a folder that holds a finished demo

generates the synthetic dataset, trains configs/tiny.yaml (ResNet-18 backbone for speed), evaluates the
best checkpoint on the held-out test split with beam search, and captions a folder of held-out images
(captions.jsonl, and gallery.html showing each word's attention map).

Ctrl-C or SIGTERM during training saves OUT/run/last.pt and exits 130/143; rerunning the same command resumes
that run. A finished demo (OUT/demo.json, written last) is never redone or deleted without --overwrite.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from captioner.jobs import caption, evaluate, train
from captioner.config import Config, load_config, shipped_config
from captioner.data.datasets import by_split, load_records
from captioner.errors import CaptionerError
from captioner.files import check_writable, write_json
from captioner.engine.runtime.device import resolve_device

log = logging.getLogger("captioner")

TINY_CONFIG = shipped_config("tiny.yaml")  # inside the package (pip install .), or configs/ in a checkout
DONE_FILE = "demo.json"  # the summary, written once everything else is: its presence marks a finished demo


@dataclass
class DemoJob:
    """`captioner demo`'s options."""
    out: str = "demo"  # everything the demo writes goes under this folder
    device: str | None = "auto"
    overrides: list[str] = field(default_factory=list)  # section.key=value on top of configs/tiny.yaml
    overwrite: bool = False  # start over in a folder that holds a finished demo (its run is deleted)

    def __post_init__(self):
        if TINY_CONFIG is None:
            raise CaptionerError("configs/tiny.yaml is missing from this installation: reinstall captioner")
        resolve_device(self.device)  # a device the machine lacks is refused before anything is announced


def demo_config(job: DemoJob) -> Config:
    """The config the demo trains with (and `captioner demo --print-config` prints): configs/tiny.yaml on the
    synthetic data under --out, 15 epochs, then the KEY=VALUE overrides."""
    out = Path(job.out).resolve()
    return load_config(TINY_CONFIG, [f"dataset.root={out / 'data'}", "train.epochs=15", *job.overrides])


def _refuse_finished(out: Path) -> None:
    """A finished demo is not redone (its run deleted) without --overwrite: read-only, before anything else."""
    done = out / DONE_FILE
    if not done.is_file():
        return
    try:
        bleu4 = f"{json.loads(done.read_text())['bleu4']:.3f}"
    except (OSError, ValueError, KeyError, TypeError):
        bleu4 = "unknown"
    raise CaptionerError(f"{out} holds a finished demo (its BLEU-4 {bleu4}): pass --overwrite to start over, "
                         f"or --out another folder")


def main(job: DemoJob) -> dict:
    """The demo's summary; {"stopped": "SIGINT" | "SIGTERM", ...} when a signal ended its training (last.pt saved:
    a rerun resumes it)."""
    start, device = time.perf_counter(), job.device
    out = Path(job.out).resolve()
    if not job.overwrite:
        _refuse_finished(out)
    check_writable(out, "demo folder", folder=True)  # before minutes of training
    cfg = demo_config(job)
    run_dir = out / "run"
    # An interrupted demo's run is continued, never retrained; --overwrite (or a run dir with no checkpoint to
    # keep) starts afresh.
    resume = not job.overwrite and (run_dir / "last.pt").is_file()
    overwrite = not resume and (job.overwrite or not (run_dir / "best.pt").exists())
    train_job = train.TrainJob(cfg, run_dir, device, resume=resume, overwrite=overwrite)  # checks the overrides
    if job.overwrite:
        (out / DONE_FILE).unlink(missing_ok=True)  # an interrupted --overwrite run must not look finished
    log.info("demo: %s %s %s on synthetic shapes under %s", "resuming" if resume else "training",
             cfg.encoder.arch, cfg.encoder.layer or "(last stage)", out)
    summary = train.main(train_job)
    if summary["stopped"] in ("SIGINT", "SIGTERM"):  # not a finished model: no evaluation, no captions
        return {"stopped": summary["stopped"], "steps": summary["steps"], "epochs": summary["epochs"],
                "checkpoint": summary["last_checkpoint"], "output_dir": str(out),
                "seconds": round(time.perf_counter() - start, 1)}
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
    result = {"bleu1": metrics["bleu1"], "bleu4": metrics["bleu4"], "beam_size": metrics["beam_size"],
              "test_images": metrics["images"], "checkpoint": summary["best_checkpoint"], "output_dir": str(out),
              "metrics_file": metrics["metrics_file"], "captions_file": captions["out"],
              "gallery_file": captions["html"], "stopped": None,
              "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / DONE_FILE, result, "demo summary")
    return result
