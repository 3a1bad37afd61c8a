"""A training run's folder: whether a run may start in it, the files written at its start, and its metrics log.

    RUN_DIR/config.yaml, vocab.json   written at start, for people (each checkpoint holds its own copies)
    RUN_DIR/last.pt                   every train.checkpoint_every steps, at each epoch end and on SIGINT/SIGTERM
    RUN_DIR/best.pt                   when the validation score improves
    RUN_DIR/metrics.jsonl             one JSON object per logged step and per validation (loggers.py)
    RUN_DIR/tb/                       TensorBoard event files, with train.log_to: [jsonl, tensorboard]
    RUN_DIR/mlflow.db, mlartifacts/   the MLflow store, with train.log_to: [jsonl, mlflow] and no MLFLOW_TRACKING_URI
    RUN_DIR/wandb/                    W&B's files, with train.log_to: [jsonl, wandb]
    RUN_DIR/curves.png                `captioner plot RUN_DIR`

    RUN_DIR/.lock                     held by the training process (lock_run_dir): one run per folder

A folder holding another run is never overwritten without --overwrite; one holding the same run (same
config) with a last.pt is resumed. While a process trains in it, a second one is refused; the lock dies with
its process, so `captioner train --resume` right after a kill -9 works.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from captioner.config import Config, from_saved_dict, inherit_preprocess, parse_yaml, to_dict, to_yaml
from captioner.engine.infer.checkpoint import remove_stale_temporaries
from captioner.errors import CaptionerError
from captioner.files import make_parent, write_text
from captioner.lock import ProcessLock
from captioner.text import Vocabulary

log = logging.getLogger("captioner")

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "vocab.json")
DERIVED_FILES = ("curves.png",)  # made from the run files: removed with them
DERIVED_FOLDERS = ("tb",)  # TensorBoard's copy of metrics.jsonl (loggers.py)


def _flatten(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def config_differences(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every key whose value differs between two config dicts."""
    old, new = _flatten(old), _flatten(new)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _existing_config(run_dir: Path) -> dict | None:
    """The config of the run already in run_dir (None when unreadable), normalised through the dataclasses."""
    path = run_dir / "config.yaml"
    try:
        data = parse_yaml(path.read_text(), f"run config {path}")
        return to_dict(from_saved_dict(data))
    except (OSError, ValueError, CaptionerError):
        return None


def plan_run(run_dir: str | Path, config: dict, resume: bool, overwrite: bool) -> str:
    """'new' or 'resume' for a run with this config (a dict) in run_dir; a CaptionerError when refused.

    Read-only: nothing in run_dir changes here, so a refusal leaves everything as it was."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise CaptionerError("--resume and --overwrite contradict each other: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise CaptionerError(f"run dir {run_dir} is a file, not a folder: give the folder holding last.pt "
                             f"(e.g. {run_dir.parent})")
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if "last.pt" not in present:
            holds = f"it holds only {', '.join(present)}" if present else "it holds no run"
            raise CaptionerError(f"cannot resume {run_dir}: no last.pt there ({holds}); start a run with "
                                 f"`captioner train --config FILE --run-dir {run_dir}`")
        return "resume"
    if not present or overwrite:
        return "new"
    existing = _existing_config(run_dir)
    if existing is not None:  # preprocessing left to the weights is the run's own
        config = inherit_preprocess(config, existing)
    if existing == config:
        if "last.pt" in present:
            log.info("%s already holds this run (same config): resuming it from last.pt; pass --overwrite to "
                     "start over", run_dir)
            return "resume"
        return "new"  # the same run, stopped before its first checkpoint: nothing to keep
    if existing is None:
        why = f"its config.yaml is missing or unreadable, and it holds {', '.join(present)}"
    else:
        changes = config_differences(existing, config)
        why = f"config differs in {'; '.join(changes[:4])}{' ...' if len(changes) > 4 else ''}"
        if not {"last.pt", "best.pt"} & set(present):  # --resume could not continue it: nothing to keep
            log.info("%s holds a run stopped before its first checkpoint (%s): starting over", run_dir, why)
            return "new"
    raise CaptionerError(f"run dir {run_dir} already holds a different run ({why}); resume it with "
                         f"`captioner train --resume {run_dir}`, pick another --run-dir, or pass --overwrite")


def lock_run_dir(run_dir: str | Path) -> ProcessLock:
    """run_dir (created) locked for this process; a CaptionerError when another process trains in it."""
    lock_file = Path(run_dir) / ".lock"
    make_parent(lock_file, "run dir")
    return ProcessLock(lock_file, f"run dir {run_dir}", "another `captioner train` is writing there: wait for "
                       "it to finish (or stop it), or pick another --run-dir")


def clear_run_files(run_dir: str | Path) -> None:
    """Remove a previous run's files (a new run, or --overwrite), once the new run is sure to start."""
    for name in RUN_FILES + DERIVED_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    for name in DERIVED_FOLDERS:
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def write_run_files(run_dir: Path, cfg: Config, vocab: Vocabulary, clear: bool) -> None:
    try:
        if clear:
            clear_run_files(run_dir)  # --overwrite, or leftovers of this run from before its first checkpoint
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(run_dir)
        if stale:
            log.info("removed %d temporary files of interrupted saves (%s)", len(stale), ", ".join(stale[:3]))
        write_text(run_dir / "config.yaml", to_yaml(cfg), "run config")
        vocab.save(run_dir / "vocab.json")
    except OSError as e:
        raise CaptionerError(f"cannot write to run dir {run_dir}: {e.strerror or e}") from None
