"""Flickr8k / Flickr30k token files -> ImageRecords.

    records = read_flickr_tokens("data/flickr8k/Flickr8k_text/Flickr8k.token.txt", "data/flickr8k/Flicker8k_Dataset")

Flickr8k.token.txt (and Flickr30k's results_20130124.token) hold one caption per line:
`1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress is climbing up a set of stairs .`
Splits come from Flickr_8k.trainImages.txt / devImages.txt / testImages.txt (one file name per line), which
flickr8k_split_lists finds next to the token file. A malformed line is skipped with a warning naming it.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from captioner.data.records import ImageRecord, file_lines, ids_from_names, read_text
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}


def is_flickr_tokens(first_line: str) -> bool:
    name, tab, caption = first_line.partition("\t")
    return bool(tab) and "#" in name and name.rpartition("#")[2].strip().isdigit()


def flickr8k_split_lists(token_file: str | Path) -> dict[str, Path] | None:
    """The three Flickr8k split lists when they all sit next to the token file (as in Flickr8k_text.zip)."""
    folder = Path(token_file).parent
    lists = {split: folder / name for split, name in FLICKR8K_LISTS.items()}
    return lists if all(p.is_file() for p in lists.values()) else None


def report_malformed(path: Path, bad_lines: list[int], total: int, layout: str) -> None:
    """Warn about skipped lines (count and first line numbers); no usable line at all is an error."""
    if bad_lines and len(bad_lines) == total:
        raise CaptionerError(f"{path}: none of its {total} lines is of the form {layout} "
                             f"(first bad line: {bad_lines[0]})")
    if bad_lines:
        log.warning("%s: %d malformed lines skipped (lines %s%s); expected %s", path, len(bad_lines),
                    ", ".join(map(str, bad_lines[:5])), ", ..." if len(bad_lines) > 5 else "", layout)


def read_flickr_tokens(path: str | Path, images_dir: str | Path, encoding: str = "") -> list[ImageRecord]:
    """All images named in the token file with their captions; split "" (the caller applies the lists)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"Flickr token file {path} not found")
    captions, bad, total = defaultdict(list), [], 0
    for number, line in enumerate(file_lines(read_text(path, "Flickr token file", encoding)), start=1):
        if not line.strip():
            continue
        total += 1
        name, tab, caption = line.partition("\t")
        name, hash_sign, _ = name.strip().rpartition("#")
        if not tab or not hash_sign or not name or not caption.strip():
            bad.append(number)
            continue
        captions[name].append(caption.strip())
    report_malformed(path, bad, total, "NAME.jpg#N<TAB>caption")
    ids = ids_from_names(list(captions))
    records = [ImageRecord(ids[name], str(Path(images_dir) / name), caps, "") for name, caps in captions.items()]
    return sorted(records, key=lambda r: r.image_id)
