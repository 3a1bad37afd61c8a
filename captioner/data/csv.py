"""Image/caption tables -> ImageRecords: the common CSV form (Kaggle's Flickr8k captions.txt, one's own data).

    records = read_csv("data/flickr8k/captions.txt", "data/flickr8k/Images")

A header row names the columns; one row per caption, so an image with five captions has five rows:

    image,caption
    1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs in an entry way .

The delimiter may be , | ; or TAB (Flickr30k's results.csv is `image_name| comment_number| comment`).
Column names are matched case-insensitively with the aliases below; optional `split` (train/val/test) and
`image_id` columns are used when present. A malformed row is skipped with a warning naming its line; so is a
row with an empty caption, a split other than those below or an image_id that is not a whole number, each with
its own reason. The same image and caption given twice are counted once, with a warning.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections import defaultdict
from pathlib import Path

from captioner.data.flickr import report_malformed
from captioner.data.records import ImageRecord, file_lines, ids_from_names, read_text
from captioner.errors import CaptionerError

IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file", "path", "image_path", "img")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence", "description")
SPLIT_NAMES = {"train": "train", "val": "val", "test": "test", "dev": "val", "valid": "val",
               "validation": "val", "restval": "train"}
DELIMITERS = (",", "|", "\t", ";")

log = logging.getLogger("captioner")


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    return next((lowered.index(n) for n in names if n in lowered), None)


def table_columns(first_line: str) -> tuple[str, int, int] | None:
    """(delimiter, image column, caption column) when first_line is a header naming both, else None."""
    for delimiter in DELIMITERS:
        header = next(csv.reader([first_line], delimiter=delimiter))
        image, caption = _column(header, IMAGE_COLUMNS), _column(header, CAPTION_COLUMNS)
        if image is not None and caption is not None:
            return delimiter, image, caption
    return None


class SkippedRows:
    """Rows skipped for a reason that is not their layout (an empty caption, an unknown split): one warning per
    reason, with the count and first line numbers, so a typo such as `tst` is named as what it is."""

    def __init__(self):
        self.lines: dict[str, list[int]] = defaultdict(list)

    def check(self, number: int, image: str, caption: str, split_value, id_value) -> tuple | None:
        """(image, caption, split or None, image id or None) for a usable row, else None (the reason noted)."""
        split = parse_split(split_value) if split_value is not None else None
        image_id = parse_id(id_value) if id_value is not None else None
        reason = ("an empty image name" if not image.strip() else "an empty caption" if not caption.strip()
                  else f"split {str(split_value).strip()!r}, not one of {', '.join(SPLIT_NAMES)}"
                  if split_value is not None and split is None
                  else f"image_id {str(id_value).strip()!r}, not a whole number"
                  if id_value is not None and image_id is None else None)
        if reason is None:
            return image.strip(), caption.strip(), split, image_id
        lines = self.lines[reason]
        if not lines or lines[-1] != number:  # a JSONL line of several captions counts once
            lines.append(number)
        return None

    def report(self, path: Path, usable: int) -> None:
        """Warn per reason; when no row at all is usable, that is an error naming the most common reason."""
        if not self.lines:
            return
        if not usable:
            reason, lines = max(self.lines.items(), key=lambda item: len(item[1]))
            raise CaptionerError(f"{path}: no usable caption row; {len(lines)} rows have {reason} "
                                 f"(first: line {lines[0]})")
        for reason, lines in self.lines.items():
            log.warning("%s: %d rows skipped (lines %s%s): %s", path, len(lines), ", ".join(map(str, lines[:5])),
                        ", ..." if len(lines) > 5 else "", reason)


def _local_name(name: str, images_dir: str | Path) -> str:
    """A name written on Windows (`photos\\a.jpg`, backslashes) read on Linux or macOS: the file it means when no
    file bears the literal name (a backslash is a legal, if rare, character there)."""
    if "\\" not in name or os.sep == "\\" or (Path(images_dir) / name).exists():
        return name
    posix = name.replace("\\", "/")
    return posix if (Path(images_dir) / posix).exists() else name


def records_from_rows(rows, images_dir: str | Path, source: str = "") -> list[ImageRecord]:
    """rows: (image name, caption, split or None, image id or None) -> one record per image, by image id.
    A caption repeated for the same image (a file concatenated twice, a copied row) is kept once: twice, it
    would count as two references in validation scores and weigh double in training."""
    captions, split_of, id_of, repeated = defaultdict(list), {}, {}, []
    seen = set()
    for name, caption, split, image_id in rows:
        name = _local_name(name, images_dir)
        if (name, caption) in seen:
            repeated.append((name, caption))
            continue
        seen.add((name, caption))
        captions[name].append(caption)
        if split is not None and split_of.setdefault(name, split) != split:
            raise CaptionerError(f"image {name} is in split {split_of[name]} on one row and {split} on another")
        if image_id is not None and id_of.setdefault(name, image_id) != image_id:
            raise CaptionerError(f"image {name} has image_id {id_of[name]} on one row and {image_id} on another")
    if repeated:
        log.warning("%s%d rows repeat an earlier row's image and caption and are counted once (first: %s, %r)",
                    f"{source}: " if source else "", len(repeated), *repeated[0])
    if len(id_of) < len(captions):  # ids only when every image has one
        id_of = ids_from_names(list(captions))
    # Split "" (no split column): load_records splits by list files or dataset.val_fraction instead.
    records = [ImageRecord(id_of[name], str(Path(images_dir) / name), caps, split_of.get(name, ""))
               for name, caps in captions.items()]
    if len({r.image_id for r in records}) != len(records):
        raise CaptionerError("the image_id column gives the same id to different images")
    return sorted(records, key=lambda r: r.image_id)


def parse_split(value) -> str | None:
    return SPLIT_NAMES.get(str(value).strip().lower())


def parse_id(value) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def read_csv(path: str | Path, images_dir: str | Path, encoding: str = "") -> list[ImageRecord]:
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"CSV file {path} not found")
    text = read_text(path, "CSV file", encoding)
    columns = table_columns(file_lines(text)[0]) if text.strip() else None
    if columns is None:
        raise CaptionerError(f"CSV file {path}: the first line must be a header naming an image column "
                             f"({', '.join(IMAGE_COLUMNS[:3])}, ...) and a caption column "
                             f"({', '.join(CAPTION_COLUMNS[:3])}, ...), e.g. 'image,caption'")
    delimiter, image_col, caption_col = columns
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    split_col = header.index("split") if "split" in header else None
    id_col = header.index("image_id") if "image_id" in header else None
    needed = max(c for c in (image_col, caption_col, split_col, id_col) if c is not None)
    rows, bad, joined, total, skipped, spanning = [], [], [], 0, SkippedRows(), []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long caption is no reason to fail: the text is read already
    try:
        first = 2  # the first physical line of the next row
        for row in reader:
            number = reader.line_num  # the last physical line of the row: a quoted caption may span lines
            first, start = number + 1, first
            if not any(field.strip() for field in row):
                continue
            total += 1
            if number > start:
                spanning.append(f"{start}-{number}")
            if len(row) > len(header):  # the caption held the delimiter without quotes
                if caption_col != len(header) - 1:  # not the last column: which field belongs where is unknown
                    bad.append(number)
                    continue
                row = row[:caption_col] + [delimiter.join(row[caption_col:])]  # the caption as it was typed
                joined.append(number)
            if len(row) <= needed:
                bad.append(number)
                continue
            usable = skipped.check(number, row[image_col], row[caption_col],
                                   row[split_col] if split_col is not None else None,
                                   row[id_col] if id_col is not None else None)
            if usable is not None:
                rows.append(usable)
    except csv.Error as e:
        raise CaptionerError(f"CSV file {path}, line {reader.line_num}: {e}") from None
    finally:
        csv.field_size_limit(limit)
    if spanning:  # legal when quoted on purpose; a quote left open silently joins every row up to the next quote
        log.warning("%s: %d rows span several lines (lines %s%s): a quote left open joins the rows after it into "
                    "one caption; check them", path, len(spanning), ", ".join(spanning[:5]),
                    ", ..." if len(spanning) > 5 else "")
    if joined:
        log.warning("%s: %d rows have more %r-separated fields than the header (lines %s%s): their caption held the "
                    "delimiter unquoted, and the extra fields were kept as part of the caption (the last column); "
                    "quote such captions", path, len(joined), delimiter, ", ".join(map(str, joined[:5])),
                    ", ..." if len(joined) > 5 else "")
    report_malformed(path, bad, total, f"a row with {delimiter!r}-separated {', '.join(header)}"
                     + (" (a caption holding the delimiter must be quoted when it is not the last column)"
                        if caption_col != len(header) - 1 else ""))
    skipped.report(path, len(rows))
    try:
        return records_from_rows(rows, images_dir, str(path))
    except CaptionerError as e:
        raise CaptionerError(f"CSV file {path}: {e}") from None
