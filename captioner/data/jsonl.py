"""JSON Lines captions -> ImageRecords: one object per line, for one's own data.

    {"image": "photos/0001.jpg", "caption": "a dog on a beach"}
    {"image": "photos/0002.jpg", "captions": ["two cats", "cats asleep"], "split": "test"}

Keys are matched like the CSV reader's columns (image/file_name/path..., caption/text..., captions as a list);
optional "split" and "image_id". A malformed line is skipped with a warning naming it; so is a line with an
empty caption, an unknown split or a non-integer image_id, each with its own reason (csv.SkippedRows).
"""
from __future__ import annotations

import json
from pathlib import Path

from captioner.data.csv import CAPTION_COLUMNS, IMAGE_COLUMNS, SkippedRows, records_from_rows
from captioner.data.flickr import report_malformed
from captioner.data.records import ImageRecord, file_lines, read_text
from captioner.errors import CaptionerError


def _first(obj: dict, names: tuple[str, ...]):
    return next((obj[n] for n in names if n in obj), None)


def _rows(obj, number: int, skipped: SkippedRows) -> list[tuple] | None:
    """One line's (image, caption, split, image_id) rows; None when the line is malformed (not an object with
    an image name and captions as text); [] when its values are not usable (skipped notes why)."""
    if not isinstance(obj, dict):
        return None
    obj = {str(k).lower(): v for k, v in obj.items()}
    image = _first(obj, IMAGE_COLUMNS)
    captions = obj.get("captions", _first(obj, CAPTION_COLUMNS))
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(image, str) or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None
    given = [c for c in captions if c.strip()] or [""]  # an empty one among others is dropped; alone, it is noted
    usable = [skipped.check(number, image, c, obj.get("split"), obj.get("image_id")) for c in given]
    return [row for row in usable if row is not None]


def read_jsonl(path: str | Path, images_dir: str | Path, encoding: str = "") -> list[ImageRecord]:
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"JSONL file {path} not found")
    rows, bad, total, skipped = [], [], 0, SkippedRows()
    for number, line in enumerate(file_lines(read_text(path, "JSONL file", encoding)), start=1):
        if not line.strip():
            continue
        total += 1
        try:
            line_rows = _rows(json.loads(line), number, skipped)
        except ValueError:
            line_rows = None
        if line_rows is None:
            bad.append(number)
        else:
            rows.extend(line_rows)
    report_malformed(path, bad, total, '{"image": ..., "caption": ...}')
    skipped.report(path, len(rows))
    try:
        return records_from_rows(rows, images_dir, str(path))
    except CaptionerError as e:
        raise CaptionerError(f"JSONL file {path}: {e}") from None
