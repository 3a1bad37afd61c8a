"""COCO captions JSON (captions_train2017.json and the like) -> ImageRecords.

Splits come from an optional splits JSON ({"train": [image ids], "val": [...], "test": [...]}); without
one, the images are split deterministically by id: the last val_fraction for test, the one before for val.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from captioner.data.records import ImageRecord
from captioner.errors import CaptionerError


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise CaptionerError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CaptionerError(f"{what} {path} is not valid JSON: {e}") from None


def read_coco(annotations: str | Path, images_dir: str | Path, splits: str | Path | None = None,
              val_fraction: float = 0.1) -> list[ImageRecord]:
    annotations = Path(annotations)
    data = _read_json(annotations, "annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise CaptionerError(f"annotations file {annotations} is not COCO captions format "
                             f"(needs 'images' and 'annotations' lists)")
    captions = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise CaptionerError(f"annotations file {annotations}: annotation #{i} lacks image_id or caption")
        captions[ann["image_id"]].append(ann["caption"].strip())
    records = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise CaptionerError(f"annotations file {annotations}: image #{i} lacks id or file_name")
        records.append(ImageRecord(img["id"], str(Path(images_dir) / img["file_name"]), captions.get(img["id"], [])))
    records.sort(key=lambda r: r.image_id)
    if splits:
        assignment = _read_json(Path(splits), "splits file")
        split_of = {image_id: name for name, ids in assignment.items() for image_id in ids}
        for r in records:
            r.split = split_of.get(r.image_id, "unused")
    else:
        n_held = int(len(records) * val_fraction)
        for j, r in enumerate(records):
            r.split = "test" if j >= len(records) - n_held else "val" if j >= len(records) - 2 * n_held else "train"
    return records
