"""Where training's records go: one fan-out (run_log.RunLog) to metrics.jsonl (always: the source of truth) and
the trackers of train.log_to, one module each: TensorBoard (tensorboard_log.py), MLflow (mlflow_log.py), Weights &
Biases (wandb_log.py).

    log = open_run_log(cfg, run_dir, enabled=process.is_main, checkpoint=state)   # resume: each cut back
    log.write({"step": 12, "epoch": 1, "loss": 2.31, "lr": 4e-4, ...})            # each record once, to all
    log.samples(step, epoch, samples)      # validation's sample captions (engine/train/samples.py)
    log.flush()                            # before each checkpoint: a checkpoint never outruns its logs
    state["metrics_offset"], state["trackers"] = log.offset, log.trackers
    log.checkpointed()                     # after it: MLflow and W&B get what the checkpoint covers
    log.finish(run_dir)                    # a complete run: best.pt as a model folder, to MLflow and W&B
    log.close()

Every tracker names a record's numbers as TensorBoard does (base.scalars): "train/loss", "epoch/val_cider", at the
record's step. A resumed run logs each step once to each of them: metrics.jsonl is truncated to the checkpoint's
byte offset, tb/ event files are rewritten without the events after its step, and MLflow and W&B, which cannot
take records back, are sent records only once a checkpoint covers them.
"""
from captioner.engine.train.loggers.base import COORDINATES, Logger, scalars
from captioner.engine.train.loggers.jsonl import MetricsLog, read_metrics
from captioner.engine.train.loggers.run_log import RunLog, check_log_to, open_run_log
from captioner.engine.train.loggers.tensorboard_log import (TB_FOLDER, TensorBoardLogger, check_tensorboard,
                                                            drop_events_after, wait_for_a_later_file_name)

__all__ = ["COORDINATES", "Logger", "scalars", "MetricsLog", "read_metrics", "RunLog", "check_log_to",
           "open_run_log", "TB_FOLDER", "TensorBoardLogger", "check_tensorboard", "drop_events_after",
           "wait_for_a_later_file_name"]
