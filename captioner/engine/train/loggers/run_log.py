"""The fan-out the training loop writes to, and opening it per train.log_to."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from captioner.config import Config, to_dict
from captioner.engine.train.loggers.base import Logger
from captioner.engine.train.loggers.jsonl import MetricsLog, read_metrics
from captioner.engine.train.loggers.tensorboard_log import (TB_FOLDER, TensorBoardLogger, check_tensorboard,
                                                            drop_events_after)


def check_log_to(log_to: list[str]) -> None:
    """One clear line, before anything runs, for each tracker train.log_to asks for that is not installed."""
    from captioner.engine.train.loggers.mlflow_log import check_mlflow
    from captioner.engine.train.loggers.wandb_log import check_wandb
    checks = {"tensorboard": check_tensorboard, "mlflow": check_mlflow, "wandb": check_wandb}
    for name in log_to:
        if name in checks:
            checks[name]()


class RunLog(Logger):
    """The fan-out the training loop writes to: each record once, to every logger, metrics.jsonl first."""

    def __init__(self, loggers: list[Logger], names: list[str] | None = None):
        self.loggers = loggers
        self.names = names or [type(logger).__name__ for logger in loggers]

    @property
    def offset(self) -> int:
        """metrics.jsonl's size: what a checkpoint records, to truncate back to on resume."""
        return self.loggers[0].offset

    @property
    def trackers(self) -> dict:
        """{"mlflow": {"run_id": ...}, ...}: what each tracker needs to continue its run on resume (checkpoints
        keep it)."""
        return {name: state for name, state in ((name, logger.state()) for name, logger in
                                                zip(self.names, self.loggers)) if state is not None}

    def write(self, record: dict) -> None:
        for logger in self.loggers:
            logger.write(record)

    def samples(self, step: int, epoch: int, samples: list) -> None:
        for logger in self.loggers:
            logger.samples(step, epoch, samples)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def checkpointed(self) -> None:
        for logger in self.loggers:
            logger.checkpointed()

    def finish(self, run_dir: Path) -> None:
        for logger in self.loggers:
            logger.finish(run_dir)

    def close(self) -> None:
        for logger in reversed(self.loggers):  # metrics.jsonl last: a tracker failing to close loses nothing
            logger.close()


def open_run_log(cfg: Config, run_dir: Path, enabled: bool, checkpoint: dict | None = None,
                 device: str = "cpu", dtype: str = "float32") -> RunLog:
    """The run's loggers per train.log_to (metrics.jsonl always), cut back to checkpoint when resuming.
    enabled: False on every process but rank 0, which alone logs. device and dtype tag the trackers' runs."""
    jsonl = MetricsLog(run_dir / "metrics.jsonl", enabled=enabled,
                       truncate_to=checkpoint["metrics_offset"] if checkpoint else None)
    loggers: list[Logger] = [jsonl]
    names = ["jsonl"]
    log_to = cfg.train.log_to if enabled else []
    try:
        if "tensorboard" in log_to:
            tb = run_dir / TB_FOLDER
            new_to_tensorboard = checkpoint and not any(tb.glob("events.out.tfevents.*"))  # log_to changed on resume
            loggers.append(TensorBoardLogger(tb, to_dict(cfg), checkpoint["step"] if checkpoint else None,
                                             read_metrics(jsonl.path) if new_to_tensorboard else ()))
            names.append("tensorboard")
        elif enabled and checkpoint and any((run_dir / TB_FOLDER).glob("events.out.tfevents.*")) \
                and importlib.util.find_spec("tensorboard"):  # turned off at this resume: tb/ still ends at last.pt
            drop_events_after(run_dir / TB_FOLDER, checkpoint["step"])
        trackers = [name for name in ("mlflow", "wandb") if name in log_to]
        if trackers:
            from captioner.engine.train.loggers.base import run_tags
            tags = run_tags(device, dtype)
            history = read_metrics(jsonl.path) if checkpoint else []
            saved = (checkpoint or {}).get("trackers") or {}
        for name in trackers:
            if name == "mlflow":
                from captioner.engine.train.loggers.mlflow_log import MlflowLogger as Tracker
            else:
                from captioner.engine.train.loggers.wandb_log import WandbLogger as Tracker
            loggers.append(Tracker(cfg, run_dir, tags, saved.get(name), history))
            names.append(name)
    except BaseException:
        RunLog(loggers, names).close()
        raise
    return RunLog(loggers, names)
