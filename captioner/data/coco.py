"""COCO captions JSON (captions_train2014.json, captions_val2017.json, ...) -> ImageRecords, via pycocotools.

    records = read_coco("data/coco/annotations/captions_val2014.json", "data/coco/val2014")

The file is indexed by pycocotools' COCO class, the same index coco-caption's scorer uses, after a check of
the fields it needs (so a malformed file is one clear line, not a KeyError from inside pycocotools).
The official files bring no train/val/test split: records get split "" and load_records assigns one
(from dataset.splits or dataset.val_fraction).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from pycocotools.coco import COCO

from captioner.data.records import ImageRecord, read_json
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_images(images: list[dict], path: Path) -> list[dict]:
    """The 'images' list with each id once. An id given to two different files is an error (pycocotools would
    keep one file and give it the captions of both); the same entry listed again is dropped with a warning."""
    first, repeats, clashes = {}, 0, []
    for img in images:
        seen = first.setdefault(img["id"], img)
        if seen is img:
            continue
        if seen["file_name"] == img["file_name"]:
            repeats += 1
        else:
            clashes.append((img["id"], seen["file_name"], img["file_name"]))
    if clashes:
        image_id, a, b = clashes[0]
        raise CaptionerError(f"annotations file {path}: {len(clashes)} image ids are given to two different files "
                             f"(first: id {image_id} is {a} and {b}), so their captions would be merged onto one "
                             f"photo; give each image its own id")
    if repeats:
        log.warning("annotations file %s: %d duplicate entries in 'images' (same id, same file) are counted once",
                    path, repeats)
    return list(first.values()) if repeats else images


def coco_index(data, path: Path) -> COCO:
    """A pycocotools COCO index over already-parsed COCO captions data; annotation ids are added if absent."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise CaptionerError(f"annotations file {path} is not COCO captions format "
                             f"(needs 'images' and 'annotations' lists)")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise CaptionerError(f"annotations file {path}: images[{i}] lacks an integer 'id' or a 'file_name'")
    data = {**data, "images": _unique_images(data["images"], path)}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise CaptionerError(f"annotations file {path}: annotations[{i}] lacks 'image_id' or a 'caption' string")
        ann.setdefault("id", i)  # pycocotools indexes annotations by id; hand-made files often leave it out
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        coco.createIndex()
    return coco


def read_coco(annotations: str | Path, images_dir: str | Path, data=None, encoding: str = "") -> list[ImageRecord]:
    """Every image of the file with its (stripped, non-empty) captions, sorted by image id.
    data: the file's already-parsed JSON, to avoid reading a large file twice."""
    annotations = Path(annotations)
    if data is None:
        data = read_json(annotations, "annotations file", encoding)
    coco = coco_index(data, annotations)
    orphans = set(coco.imgToAnns) - set(coco.imgs)
    if orphans:
        log.warning("annotations file %s: captions of %d image ids absent from its 'images' list are ignored "
                    "(first: %s)", annotations, len(orphans), sorted(orphans, key=str)[:3])
    records = []
    for image_id, img in coco.imgs.items():
        captions = [a["caption"].strip() for a in coco.imgToAnns.get(image_id, []) if a["caption"].strip()]
        records.append(ImageRecord(image_id, str(Path(images_dir) / img["file_name"]), captions, ""))
    records.sort(key=lambda r: r.image_id)
    return records
