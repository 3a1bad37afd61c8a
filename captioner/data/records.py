"""The one internal form every dataset reader produces: an image file with its captions and split,
and the small helpers the readers share (split assignment, ids from file names, missing files)."""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.files import read_text
from captioner.text import tokenize

log = logging.getLogger("captioner")

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    image_id: int
    path: str  # absolute or relative to the working directory
    captions: list[str] = field(default_factory=list)
    split: str = "train"  # train | val | test; unused: in no split; "": not assigned yet (see load_records)


def by_split(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    return [r for r in records if r.split == split]


def file_lines(text: str) -> list[str]:
    """A text file's lines, split at line feeds only (a CRLF's carriage return dropped; a file of bare carriage
    returns split at those): str.splitlines would also split inside a caption at U+2028, U+0085, a form feed
    or a vertical tab, which JSON and CSV keep unescaped, and turn one record into two broken ones."""
    if "\n" not in text and "\r" in text:  # classic Mac line ends
        return text.split("\r")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_json(path: Path, what: str, encoding: str = ""):
    if not path.is_file():
        raise CaptionerError(f"{what} {path} not found")
    text = read_text(path, what, encoding)
    try:
        return json.loads(text)
    except ValueError as e:
        raise CaptionerError(f"{what} {path} is not valid JSON: {e}") from None


def check_unique(records: list[ImageRecord], source: str) -> None:
    """Refuse records that would silently corrupt a split: one id given to two images (their captions would be
    merged onto one photo), one image file listed under two ids (the same photo could land in train and in
    test), or a name no file can have. Paths are compared as the files they name ("a.jpg", "./a.jpg" and
    "/abs/a.jpg" are one file)."""
    unnamable = [r for r in records if "\x00" in r.path]
    if unnamable:
        raise CaptionerError(f"{source}: {len(unnamable)} image names hold a NUL character, which no file name can "
                             f"hold (first: {unnamable[0].path!r})")
    by_id, by_file = defaultdict(list), defaultdict(list)
    for r in records:
        by_id[r.image_id].append(r)
        by_file[os.path.normpath(os.path.abspath(r.path))].append(r)
    shared_ids = [rs for rs in by_id.values() if len(rs) > 1]
    if shared_ids:
        a, b = shared_ids[0][:2]
        raise CaptionerError(f"{source}: {len(shared_ids)} image ids are given to more than one image (first: id "
                             f"{a.image_id} is {a.path} and {b.path}); give each image its own id")
    shared_files = [rs for rs in by_file.values() if len(rs) > 1]
    if shared_files:
        a, b = shared_files[0][:2]
        raise CaptionerError(f"{source}: {len(shared_files)} image files are listed under more than one id (first: "
                             f"{a.path} is id {a.image_id} and id {b.image_id}), so one photo could be trained on "
                             f"and tested on; list each image once")


_ASCII_WORD = re.compile(r"[A-Za-z0-9]")  # a caption holding one is never wordless: tokenize only the others


def drop_wordless(records: list[ImageRecord], source: str) -> None:
    """Drop captions that hold no word once tokenized (only emoji, punctuation or symbols: "🐶🎉 !!"), with a
    warning: kept, each would teach the model to end a caption at once, and score as an empty reference."""
    dropped, first = 0, None
    for r in records:
        kept = [c for c in r.captions if _ASCII_WORD.search(c) or tokenize(c)]
        if len(kept) < len(r.captions):
            dropped += len(r.captions) - len(kept)
            first = first or (r.path, next(c for c in r.captions if c not in kept))
            r.captions = kept
    if dropped:
        log.warning("%s: %d captions hold no word (only symbols, emoji or punctuation) and are not used (first: %s, "
                    "%r)", source, dropped, *first)


def split_by_fraction(records: list[ImageRecord], val_fraction: float) -> None:
    """Deterministic split when the dataset brings none: in image id order, the last val_fraction is test,
    the val_fraction before it val, the rest train."""
    records = sorted(records, key=lambda r: r.image_id)
    n_held = int(len(records) * val_fraction)
    for j, r in enumerate(records):
        r.split = "test" if j >= len(records) - n_held else "val" if j >= len(records) - 2 * n_held else "train"


def split_from_ids_file(records: list[ImageRecord], path: Path) -> None:
    """Splits JSON {"train": [image ids], "val": [...], "test": [...]}; images in no list become 'unused'."""
    assignment = read_json(path, "splits file")
    if not isinstance(assignment, dict) or not all(isinstance(v, list) for v in assignment.values()):
        raise CaptionerError(f"splits file {path} must be a JSON object of lists of image ids, "
                             f'e.g. {{"train": [1, 2], "val": [3], "test": [4]}}')
    split_of = {image_id: name for name, ids in assignment.items() for image_id in ids}
    for r in records:
        r.split = split_of.get(r.image_id, "unused")


def split_from_name_lists(records: list[ImageRecord], lists: dict[str, Path], encoding: str = "") -> None:
    """Flickr-style split lists: one image file name per line per split ({"train": Flickr_8k.trainImages.txt,
    ...}); images in no list become 'unused'."""
    split_of = {}
    for split, path in lists.items():
        if not path.is_file():
            raise CaptionerError(f"{split} image list {path} not found")
        for line in file_lines(read_text(path, f"{split} image list", encoding)):
            if line.strip():
                split_of[Path(line.strip()).name] = split
    for r in records:
        r.split = split_of.get(Path(r.path).name, "unused")


_LEADING_DIGITS = re.compile(r"^(\d+)")


def ids_from_names(names: list[str]) -> dict[str, int]:
    """Integer image ids for datasets that only name their files (Flickr, CSV).

    The Flickr photo id at the start of the name (1000268201_693b08cb0e.jpg -> 1000268201) when every name has
    one and they are unique, so results files point at recognisable photos; otherwise 0..N-1 in name order.
    """
    unique = sorted(set(names))
    matches = [_LEADING_DIGITS.match(Path(n).name) for n in unique]
    if all(matches) and len({int(m.group(1)) for m in matches}) == len(unique):
        return {n: int(m.group(1)) for n, m in zip(unique, matches)}
    return {n: i for i, n in enumerate(unique)}


def find_missing(records: list[ImageRecord]) -> list[ImageRecord]:
    """Records whose image file does not exist. Lists each folder once instead of one stat per image,
    which matters on network file systems with COCO's 123k images."""
    by_folder = defaultdict(list)
    for r in records:
        by_folder[os.path.dirname(r.path)].append(r)
    missing = []
    for folder, folder_records in by_folder.items():
        try:
            present = set(os.listdir(folder or "."))
        except OSError:
            present = set()
        missing.extend(r for r in folder_records if os.path.basename(r.path) not in present)
    return missing


def drop_missing(records: list[ImageRecord], max_missing_fraction: float, what: str) -> list[ImageRecord]:
    """Records whose image exists. Missing ones are reported (count, first few) and skipped, unless more than
    max_missing_fraction of them are missing: then the folder is most likely wrong, and that is an error."""
    missing = find_missing(records)
    if not missing:
        return records
    first = ", ".join(r.path for r in missing[:3])
    fraction = len(missing) / len(records)
    if fraction > max_missing_fraction:
        raise CaptionerError(
            f"{what}: {len(missing)} of {len(records)} image files are missing ({fraction:.0%}, above "
            f"dataset.max_missing_fraction={max_missing_fraction:g}; first: {first}). Check dataset.images "
            f"(and dataset.root), or set dataset.max_missing_fraction=1 to go on without them")
    log.warning("%s: %d of %d image files are missing and skipped (first: %s)", what, len(missing), len(records),
                first)
    gone = {id(r) for r in missing}
    return [r for r in records if id(r) not in gone]
