"""Where training's records go: one fan-out to metrics.jsonl (always: the source of truth) and TensorBoard.

    log = open_run_log(cfg, run_dir, enabled=process.is_main, checkpoint=state)   # resume: both cut back
    log.write({"step": 12, "epoch": 1, "loss": 2.31, "lr": 4e-4, ...})            # each record once, to all
    log.samples(step, epoch, samples)      # validation's sample captions (engine/train/samples.py)
    state["metrics_offset"] = log.offset   # log.flush() first: a checkpoint never outruns its logs
    log.close()

A logger has write, samples, flush and close (the Logger interface below).

- MetricsLog: RUN_DIR/metrics.jsonl, one JSON object per line: step lines ({"step", "epoch", "loss", ...}),
  validation lines ({"step", "epoch", "val_cider", ..., "select_metric"}), events ({"event": "resume", ...})
  and sample captions ({"step", "epoch", "samples": [{"file", "caption", "references"}]}).
- TensorBoardLogger (train.log_to: [jsonl, tensorboard], `pip install "captioner[tensorboard]"`): RUN_DIR/tb/.
  Every number of a record becomes a scalar at the record's step, named as in metrics.jsonl under the record's
  kind: "train/loss", "train/captions_per_s" for step lines, "epoch/val_cider", "epoch/train_loss" for
  validation lines (a step line and a validation line may share a step and a key, such as lr). Values are
  metrics.jsonl's rounded to float32 (TensorBoard's data server shows no float64 scalars). Each validation adds, per
  sample image, a text "samples/I" (greedy caption, references, file) and an image "attention/I" (the
  gallery's attention strip); the resolved config is logged as hparams, with the validation scores as its
  metrics.

Resuming cuts both back to the checkpoint: metrics.jsonl is truncated to the byte offset the checkpoint
recorded, and every event after the checkpoint's step is removed from the tb/ event files (the files are
rewritten; TensorBoard's purge_step is set as well), so that no step appears twice in either.
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from captioner.config import Config, to_dict
from captioner.errors import CaptionerError
from captioner.files import atomic_write

log = logging.getLogger("captioner")

TB_FOLDER = "tb"
COORDINATES = ("step", "epoch")  # where a record is, not what it measured: no scalars of their own
HPARAMS_TAG = "_hparams_/"  # TensorBoard's hparams plugin summaries


class Logger:
    """What the training loop hands each logger; a logger overrides what it keeps."""

    def write(self, record: dict) -> None:
        """One metrics record: a step line, a validation line or an event."""

    def samples(self, step: int, epoch: int, samples: list) -> None:
        """The sample captions of one validation (engine/train/samples.py Sample)."""

    def flush(self) -> None:
        """Make everything written so far durable: called before each checkpoint."""

    def close(self) -> None:
        pass


class MetricsLog(Logger):
    """RUN_DIR/metrics.jsonl, appended one flushed line per record; a no-op on ranks other than 0.

    offset (bytes written so far) goes into each checkpoint; resuming truncates the file back to it, so lines
    logged after the checkpoint by a killed run are dropped and never appear twice."""

    def __init__(self, path: str | Path, enabled: bool = True, truncate_to: int | None = None):
        self.path, self.file = Path(path), None
        if not enabled:
            return
        if truncate_to is not None and self.path.exists():
            size = self.path.stat().st_size
            if size < truncate_to:
                log.warning("%s is shorter (%d bytes) than when last.pt was saved (%d): its earlier lines are lost",
                            self.path, size, truncate_to)
            else:
                with open(self.path, "r+b") as f:
                    f.truncate(truncate_to)
        self.file = open(self.path, "a", encoding="utf-8")

    @property
    def offset(self) -> int:
        return self.file.tell() if self.file else 0

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")  # ASCII (json escapes the rest): offset counts bytes
            self.file.flush()

    def samples(self, step: int, epoch: int, samples: list) -> None:
        self.write({"step": step, "epoch": epoch, "samples": [
            {"file": s.file, "caption": s.caption, "references": s.references} for s in samples]})

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"{path} not found: is this a run dir written by `captioner train`?")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON: skipped", path, number)
    return records


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of a metrics record: {"train/loss": 2.3, ...} or {"epoch/val_cider": 0.4, ...};
    {} for events and sample captions. Booleans and text (improved, select_metric) are not scalars."""
    if "event" in record or "samples" in record:
        return {}
    kind = "epoch" if any(key.startswith("val_") for key in record) else "train"
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in COORDINATES and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _sample_text(sample) -> str:
    """A sample's TensorBoard text (markdown): the greedy caption, its references, the file."""
    references = "\n".join(f"{i}. {r}" for i, r in enumerate(sample.references, 1))
    return f"**{sample.caption or '(empty)'}** (greedy)\n\nreferences:\n\n{references}\n\n`{sample.file}`"


def check_tensorboard() -> None:
    """One clear line before anything runs when train.log_to asks for TensorBoard and it is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise CaptionerError('train.log_to includes tensorboard, which is not installed: pip install '
                             '"captioner[tensorboard]" (or log to metrics.jsonl only: train.log_to=[jsonl])')


def drop_events_after(folder: Path, step: int) -> int:
    """Rewrite each event file in folder without the events logged after step (and without the hparams
    summaries, which the resumed run writes again). Returns how many events were removed."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    removed = 0
    for path in sorted(folder.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())  # a torn last record (kill -9) is left out
        kept = [raw for raw in records if _keep(event_pb2.Event.FromString(raw), step)]
        if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
            continue  # nothing after step, nothing torn: the file stays as it is
        with atomic_write(path, "TensorBoard event file") as f:
            writer = RecordWriter(f)  # the TFRecord framing (length, CRCs) TensorBoard reads
            for raw in kept:
                writer.write(raw)
        removed += len(records) - len(kept)
    return removed


def wait_for_a_later_file_name(folder: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second its file was opened
    (then host and pid): a resumed run opening its file in the killed run's second could sort before it (by pid),
    and the reader would take the older steps for a restart and drop them. Waits (under a second) until a new file
    sorts after every file in folder."""
    stamps = [int(part) for part in (p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*"))
              if part.isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def _keep(event, step: int) -> bool:
    if any(value.tag.startswith(HPARAMS_TAG) for value in event.summary.value):
        return False
    return event.step <= step or not event.HasField("summary")  # file_version and session log events stay


class TensorBoardLogger(Logger):
    """RUN_DIR/tb/ through torch's SummaryWriter (rank 0 only). resume_step: the checkpoint's step, after which
    every event already in tb/ is dropped; None for a new run (tb/ is emptied). history: metrics.jsonl's records
    so far, replayed when a resumed run starts logging to TensorBoard (tb/ holds no events yet), so that its
    curves start at step 1 (sample texts too; the attention strips of past validations cannot be redrawn)."""

    def __init__(self, folder: Path, config: dict, resume_step: int | None = None, history: list[dict] = ()):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        from captioner.metrics.coco import VALIDATION_KEYS
        if resume_step is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            removed = drop_events_after(folder, resume_step)
            if removed:
                log.info("%s: %d TensorBoard events after step %d removed (they are logged again)", folder,
                         removed, resume_step)
            wait_for_a_later_file_name(folder)
        # flush_secs: curves appear in TensorBoard within half a minute of being logged
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1,
                                    flush_secs=30)
        flat = {f"{section}.{key}": (", ".join(map(str, value)) if isinstance(value, list) else value)
                for section, values in config.items() for key, value in values.items()}
        metrics = {f"epoch/val_{key}": 0.0 for key in VALIDATION_KEYS}  # shown: the latest value of these scalars
        for summary in hparams({k: v for k, v in flat.items() if v is not None}, metrics):
            self.writer.file_writer.add_summary(summary)
        for record in history:
            if "samples" in record:
                self.samples(record["step"], record["epoch"], [SimpleNamespace(**s, image=None)
                                                               for s in record["samples"]])
            else:
                self.write(record)
        if history:
            log.info("%s: the %d records of metrics.jsonl logged so far copied to TensorBoard", folder, len(history))

    def write(self, record: dict) -> None:
        step = record.get("step")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)  # float32: what every TensorBoard reader shows

    def samples(self, step: int, epoch: int, samples: list) -> None:
        from torch.utils.tensorboard.summary import Summary

        from captioner.engine.outputs.gallery import attention_strip
        for i, sample in enumerate(samples):
            self.writer.add_text(f"samples/{i}", _sample_text(sample), step)
            if sample.image is not None:
                strip = attention_strip(sample.image, sample.size, sample.words, sample.alphas, sample.grid, per_row=5)
                # JPEG, as the gallery's thumbnails: add_image's PNG took 3x the time and 2.5x the bytes (tiny.yaml)
                buffer = io.BytesIO()
                Image.fromarray(strip).save(buffer, "JPEG", quality=85)
                picture = Summary.Image(height=strip.shape[0], width=strip.shape[1], colorspace=3,
                                        encoded_image_string=buffer.getvalue())
                self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"attention/{i}",
                                                                                 image=picture)]), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog(Logger):
    """The fan-out the training loop writes to: each record once, to every logger, metrics.jsonl first."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    @property
    def offset(self) -> int:
        """metrics.jsonl's size: what a checkpoint records, to truncate back to on resume."""
        return self.loggers[0].offset

    def write(self, record: dict) -> None:
        for logger in self.loggers:
            logger.write(record)

    def samples(self, step: int, epoch: int, samples: list) -> None:
        for logger in self.loggers:
            logger.samples(step, epoch, samples)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_run_log(cfg: Config, run_dir: Path, enabled: bool, checkpoint: dict | None = None) -> RunLog:
    """The run's loggers per train.log_to (metrics.jsonl always), cut back to checkpoint when resuming.
    enabled: False on every process but rank 0, which alone logs."""
    jsonl = MetricsLog(run_dir / "metrics.jsonl", enabled=enabled,
                       truncate_to=checkpoint["metrics_offset"] if checkpoint else None)
    loggers: list[Logger] = [jsonl]
    if enabled and "tensorboard" in cfg.train.log_to:
        tb = run_dir / TB_FOLDER
        new_to_tensorboard = checkpoint and not any(tb.glob("events.out.tfevents.*"))  # log_to changed on resume
        try:
            loggers.append(TensorBoardLogger(tb, to_dict(cfg), checkpoint["step"] if checkpoint else None,
                                             read_metrics(jsonl.path) if new_to_tensorboard else ()))
        except BaseException:
            jsonl.close()
            raise
    elif enabled and checkpoint and any((run_dir / TB_FOLDER).glob("events.out.tfevents.*")) \
            and importlib.util.find_spec("tensorboard"):  # turned off at this resume: tb/ still ends at last.pt
        drop_events_after(run_dir / TB_FOLDER, checkpoint["step"])
    return RunLog(loggers)
