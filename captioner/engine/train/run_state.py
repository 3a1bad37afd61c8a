"""A training run's state: what a checkpoint holds, writing it, and resuming from it.

    cfg = resume_config("runs/tiny")                 # the run's own config (+ overrides)
    state = resume_checkpoint(run_dir, cfg)           # last.pt, refused when it cannot continue this config
    restore(run, state); ...; save_checkpoints(run)   # optimizer, schedule, scaler, progress, RNG states

Each checkpoint holds the whole training state: model, optimizer, lr schedule, grad scaler, the position in
the epoch's data order and every random generator, so a resumed run repeats an uninterrupted one exactly on CPU.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from captioner.config import Config, apply_overrides, from_saved_dict, load_config, to_dict
from captioner.engine.runtime import distributed
from captioner.engine.infer.checkpoint import check_resumable, load_checkpoint, remove_stale_temporaries, save_checkpoint
from captioner.engine.runtime.compute import Compute
from captioner.engine.runtime.distributed import Process
from captioner.engine.runtime.signals import StopRequest
from captioner.engine.train.rundir import MetricsLog, clear_run_files, config_differences, plan_run
from captioner.engine.runtime.rng import restore_rng_state, rng_state
from captioner.engine.train.schedule import LRSchedule
from captioner.engine.train.step import TrainingStep
from captioner.errors import CaptionerError
from captioner.files import write_text
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary, tokenize

log = logging.getLogger("captioner")

# Config keys that shape the weights or the optimizer's parameter groups: a checkpoint resumes only under the same.
ARCHITECTURE_KEYS = ("encoder.arch", "encoder.layer", "encoder.in_channels", "encoder.image_size",
                     "encoder.finetune_from", "model.embed_dim", "model.attention_dim", "model.decoder_dim",
                     "model.features", "model.gate")


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
    metrics: MetricsLog
    process: Process
    stop: StopRequest
    compute: Compute  # the resolved precision and memory format (engine/runtime/compute.py)
    init_from: str | None = None  # the checkpoint the run's weights started from (--init-from)


def _weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def save_checkpoints(run: TrainingRun, best: bool = False) -> None:
    """Write last.pt (and best.pt) from rank 0. Every process must call it: the RNG states are gathered."""
    rng = distributed.gather_to_main(rng_state(), run.process)  # each process has its own dropout generator
    if not run.process.is_main:
        return
    progress = run.progress
    if not _weights_finite(run.model):
        log.warning("step %d: the model holds non-finite weights; last.pt is kept as it was", progress.step)
        return
    state = {"model": run.model.state_dict(), "optimizer": run.step.optimizer.state_dict(),
             "schedule": run.schedule.state_dict(), "scaler": run.step.scaler.state_dict(),
             "progress": dataclasses.asdict(progress), "rng": rng, "world_size": run.process.world_size,
             "metrics_offset": run.metrics.offset, "config": to_dict(run.cfg), "vocab": run.vocab.tokens,
             "epoch": progress.epoch, "step": progress.step, "val_scores": progress.scores,
             "init_from": run.init_from}
    save_checkpoint(run.run_dir / "last.pt", state)
    if best:
        save_checkpoint(run.run_dir / "best.pt", state)


def resume_config(run_dir: str | Path, config_path: str | Path | None = None, overrides=()) -> Config:
    """The config of a resumed run: FILE's when given (checked against the checkpoint by main), else the
    checkpoint's own; overrides apply on top (e.g. train.epochs=20 to train longer)."""
    if config_path:
        return load_config(config_path, overrides)
    plan_run(run_dir, {}, resume=True, overwrite=False)  # refuses a folder without last.pt
    path = Path(run_dir) / "last.pt"
    state = load_checkpoint(path, mmap=True)
    try:
        cfg = from_saved_dict(state["config"])
    except CaptionerError as e:
        raise CaptionerError(f"checkpoint {path} has an invalid config: {e}") from None
    return apply_overrides(cfg, list(overrides))


def resume_checkpoint(run_dir: Path, cfg: Config) -> dict:
    """last.pt of run_dir, refused when it cannot continue a run of this config."""
    path = run_dir / "last.pt"
    state = load_checkpoint(path)
    check_resumable(state, path)
    changes = config_differences(to_dict(from_saved_dict(state["config"])), to_dict(cfg))  # old keys filled in
    clashes = [c for c in changes if c.split(":")[0] in ARCHITECTURE_KEYS]
    if clashes:
        raise CaptionerError(f"checkpoint {path} does not match the config's architecture ({'; '.join(clashes)}); "
                             f"resume without --config to use the run's own, or start a new --run-dir")
    if changes:
        log.info("resuming with changed settings: %s", "; ".join(changes))
    return state


def init_checkpoint(path: str | Path, cfg: Config) -> dict:
    """The checkpoint a new run starts from (--init-from): its model weights and vocabulary, refused when its
    architecture differs from cfg's. Optimizer, schedule and progress start fresh."""
    state = load_checkpoint(path)
    clashes = [c for c in config_differences(state["config"], to_dict(cfg)) if c.split(":")[0] in ARCHITECTURE_KEYS]
    if clashes:
        raise CaptionerError(f"--init-from {path} has another architecture than the config ({'; '.join(clashes)}): "
                             f"set those keys as in the checkpoint")
    try:
        Vocabulary(state["vocab"])
    except CaptionerError as e:
        raise CaptionerError(f"--init-from {path}: {e}") from None
    return state


def vocabulary_coverage(vocab: Vocabulary, records, path) -> None:
    """Fine-tuning keeps the checkpoint's words: say how many of this data's training words it lacks."""
    words = [w for r in records for c in r.captions for w in tokenize(c)]
    unknown = sum(w not in vocab.index for w in words)
    log.info("vocabulary of %s (%d words): %.1f%% of this data's %d training words become <unk>", path, len(vocab),
             100.0 * unknown / max(len(words), 1), len(words))


def check_vocabulary(saved: list[str], vocab: Vocabulary, path: Path) -> None:
    if saved == vocab.tokens:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, vocab.tokens)) if a != b), min(len(saved), len(vocab)))
    first = (f"first difference at id {i}: {saved[i] if i < len(saved) else None!r} in the checkpoint, "
             f"{vocab.tokens[i] if i < len(vocab) else None!r} from the data")
    raise CaptionerError(f"checkpoint {path} has a {len(saved)}-word vocabulary but the training captions give "
                         f"{len(vocab)} words ({first}); the dataset or dataset.min_freq changed since the run "
                         f"started: resume with the original data or start a new --run-dir")


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


def write_run_files(run_dir: Path, cfg: Config, vocab: Vocabulary, clear: bool) -> None:
    try:
        if clear:
            clear_run_files(run_dir)  # --overwrite, or leftovers of this run from before its first checkpoint
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(run_dir)
        if stale:
            log.info("removed %d temporary files of interrupted saves (%s)", len(stale), ", ".join(stale[:3]))
        write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False), "run config")
        vocab.save(run_dir / "vocab.json")
    except OSError as e:
        raise CaptionerError(f"cannot write to run dir {run_dir}: {e.strerror or e}") from None


class Window:
    """Sums over the steps since the last metrics line (throughput, data vs compute time)."""

    def __init__(self):
        self.steps, self.loss, self.captions, self.data_s, self.compute_s = 0, 0.0, 0, 0.0, 0.0
        self.stats: dict[str, float] = {}  # SCST: summed reward, baseline, sample length, entropy, reward time
        self.start = time.perf_counter()


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    try:
        import resource  # POSIX only
    except ImportError:
        return {}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_rss_mb": round(kilobytes / 1024, 1)}
