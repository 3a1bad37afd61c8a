"""TensorBoard (train.log_to: [jsonl, tensorboard], `pip install "captioner[tensorboard]"`): RUN_DIR/tb/.

Every number of a record becomes a scalar at the record's step, named as in metrics.jsonl under the record's kind
(base.scalars): "train/loss", "train/captions_per_s" for step lines, "epoch/val_cider", "epoch/train_loss" for
validation lines (a step line and a validation line may share a step and a key, such as lr). Values are
metrics.jsonl's rounded to float32 (TensorBoard's data server shows no float64 scalars). Each validation adds, per
sample image, a text "samples/I" (the caption as validation decodes it, references, file) and an image
"attention/I" (the gallery's attention strip); the resolved config is logged as hparams, with the validation
scores as its metrics.

Resuming removes every event after the checkpoint's step from the tb/ event files (the files are rewritten;
TensorBoard's purge_step is set as well), so that no step appears twice.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from captioner.engine.train.loggers.base import Logger, attention_jpeg, flat_config, scalars
from captioner.errors import CaptionerError
from captioner.files import atomic_write

log = logging.getLogger("captioner")

TB_FOLDER = "tb"
HPARAMS_TAG = "_hparams_/"  # TensorBoard's hparams plugin summaries


def _sample_text(sample) -> str:
    """A sample's TensorBoard text (markdown): the caption and how it was decoded, its references, the file."""
    references = "\n".join(f"{i}. {r}" for i, r in enumerate(sample.references, 1))
    caption = sample.caption or "(empty)"
    return f"**{caption}** ({sample.decoding})\n\nreferences:\n\n{references}\n\n`{sample.file}`"


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
        metrics = {f"epoch/val_{key}": 0.0 for key in VALIDATION_KEYS}  # shown: the latest value of these scalars
        for summary in hparams(flat_config(config), metrics):
            self.writer.file_writer.add_summary(summary)
        for record in history:
            if "samples" in record:
                # lines written before "decoding" was logged hold greedy captions: samples were greedy then
                replayed = [SimpleNamespace(**{"decoding": "greedy", **s}, image=None) for s in record["samples"]]
                self.samples(record["step"], record["epoch"], replayed)
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

        for i, sample in enumerate(samples):
            self.writer.add_text(f"samples/{i}", _sample_text(sample), step)
            jpeg = attention_jpeg(sample)
            if jpeg is not None:
                encoded, height, width = jpeg
                picture = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encoded)
                self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"attention/{i}",
                                                                                 image=picture)]), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
