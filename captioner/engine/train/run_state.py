"""A training run's state: what training's functions share, what a checkpoint holds, and restoring it.

    run = TrainingRun(cfg, run_dir, vocab, model, step, schedule, Progress(), metrics, process, stop, compute)
    save_checkpoints(run, best=True)                  # last.pt (and best.pt), from rank 0
    restore(run, state)                               # optimizer, schedule, scaler, progress, RNG states

Each checkpoint holds the whole training state: model, optimizer, lr schedule, grad scaler, the position in
the epoch's data order and every random generator, so a resumed run repeats an uninterrupted one exactly on CPU.
Which checkpoint a run resumes or starts from is resume.py's business.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from captioner.config import Config, to_dict
from captioner.engine.infer.checkpoint import save_checkpoint
from captioner.engine.runtime import distributed
from captioner.engine.runtime.compute import Compute
from captioner.engine.runtime.distributed import Process
from captioner.engine.runtime.rng import restore_rng_state, rng_state
from captioner.engine.runtime.signals import StopRequest
from captioner.engine.train.averaging import WeightAverage
from captioner.engine.train.loggers import RunLog
from captioner.engine.train.schedule import LRSchedule
from captioner.engine.train.step import TrainingStep
from captioner.engine.train.telemetry import RunClock
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel, recorded_encoder_config
from captioner.text import Vocabulary

log = logging.getLogger("captioner")


@dataclass
class Progress:
    """Where training stands. Saved in every checkpoint as plain data, so a run resumes at the exact sample."""
    epoch: int = 0  # epochs completed
    sample: int = 0  # samples of the current epoch's global order consumed (all processes together)
    step: int = 0  # batches trained in all (steps skipped for a non-finite loss included)
    scores: dict = field(default_factory=dict)  # the last validation's scores
    best_score: float = -math.inf  # best validation train.select_metric so far
    best_scores: dict = field(default_factory=dict)  # every validation score at that point
    evals_without_gain: int = 0  # validations since the best one, for early stopping
    bad_steps: int = 0  # consecutive non-finite losses
    loss_sum: float = 0.0  # this epoch's summed loss and number of steps, for its mean
    loss_count: int = 0
    reward_sum: float = 0.0  # SCST: this epoch's summed mean reward (over the same steps as loss_sum)
    elapsed_s: float = 0.0  # seconds the run has been training, over all its sessions (plots against time)

@dataclass
class TrainingRun:
    """What training's functions share (instead of script globals)."""
    cfg: Config
    run_dir: Path
    vocab: Vocabulary
    model: CaptionModel  # the plain model: checkpoints and validation use it, never a wrapper
    step: TrainingStep  # the loss (in DistributedDataParallel with several processes), optimizer and scaler
    schedule: LRSchedule
    progress: Progress
    metrics: RunLog  # metrics.jsonl and the other train.log_to loggers (loggers.py)
    process: Process
    stop: StopRequest
    compute: Compute  # the resolved precision and memory format (engine/runtime/compute.py)
    init_from: str | None = None  # the checkpoint the run's weights started from (--init-from)
    clock: RunClock | None = None  # the whole run's progress line and ETA, set once progress is restored
    average: WeightAverage | None = None  # train.ema_decay: the averaged weights that validation and checkpoints hold

    def validated_weights(self):
        """A context in which self.model holds the weights that validation scores (the average, when there is one)."""
        return self.average.applied(self.model) if self.average else contextlib.nullcontext(self.model)

def _weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())

def recorded_config(run: TrainingRun) -> Config:
    """The run's config as checkpoints record it: with the encoder's resolved preprocessing (mean, std, resize)."""
    return dataclasses.replace(run.cfg, encoder=recorded_encoder_config(run.cfg.encoder, run.model.encoder))

def save_checkpoints(run: TrainingRun, best: bool = False) -> None:
    """Write last.pt (and best.pt) from rank 0. Every process must call it: the RNG states are gathered."""
    rng = distributed.gather_to_main(rng_state(), run.process)  # each process has its own dropout generator
    if not run.process.is_main:
        return
    progress = run.progress
    if run.clock:
        progress.elapsed_s = run.clock.elapsed()
    run.metrics.flush()  # everything logged up to this step is on disk before the checkpoint says it is
    if not _weights_finite(run.model):
        log.warning("step %d: the model holds non-finite weights; last.pt is kept as it was", progress.step)
        return
    weights = run.average.checkpoint_fields(run.model) if run.average else {"model": run.model.state_dict()}
    state = {**weights, "optimizer": run.step.optimizer.state_dict(),
             "schedule": run.schedule.state_dict(), "scaler": run.step.scaler.state_dict(),
             "progress": dataclasses.asdict(progress), "rng": rng, "world_size": run.process.world_size,
             "metrics_offset": run.metrics.offset, "config": to_dict(recorded_config(run)), "vocab": run.vocab.tokens,
             "epoch": progress.epoch, "step": progress.step, "val_scores": progress.scores,
             "init_from": run.init_from, "trackers": run.metrics.trackers}
    save_checkpoint(run.run_dir / "last.pt", state)
    if best:
        save_checkpoint(run.run_dir / "best.pt", state)
    run.metrics.checkpointed()  # MLflow and W&B get the records last.pt covers, never more (loggers/)

def restore(run: TrainingRun, state: dict) -> None:
    """Optimizer, schedule, scaler, progress and random generators from a checkpoint."""
    try:
        run.step.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CaptionerError(f"checkpoint {run.run_dir / 'last.pt'}: optimizer state does not fit: {e}") from None
    run.schedule.load_state_dict(state["schedule"])
    if state["scaler"] and run.step.scaler.is_enabled():
        run.step.scaler.load_state_dict(state["scaler"])
    run.progress = Progress(**state["progress"])
    states, process = state["rng"], run.process
    if len(states) != process.world_size:
        log.warning("last.pt was written by %d processes, this run has %d: the data order continues at the same "
                    "sample, dropout randomness differs from an uninterrupted run", len(states), process.world_size)
    restore_rng_state(states[process.rank % len(states)])
