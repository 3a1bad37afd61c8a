"""RUN_DIR/metrics.jsonl: every record of a run, one JSON object per line, the source of truth (resume and
`captioner plot` read it; the other loggers show what it holds).

Step lines ({"step", "epoch", "loss", ...}), validation lines ({"step", "epoch", "val_cider", ...,
"select_metric"}), events ({"event": "resume", ...}) and sample captions ({"step", "epoch", "samples": [{"file",
"caption", "references"}]}). Resuming truncates the file to the byte offset the checkpoint recorded, so lines
logged after the checkpoint by a killed run never appear twice.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from captioner.engine.train.loggers.base import Logger
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")


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
            {"file": s.file, "caption": s.caption, "decoding": s.decoding, "references": s.references}
            for s in samples]})

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
