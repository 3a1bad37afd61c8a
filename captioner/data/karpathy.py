"""Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json) -> ImageRecords.

    records = read_karpathy("data/coco/dataset_coco.json", "data/coco")   # data/coco/{train2014,val2014}/...

Layout: {"images": [{"filepath": "val2014" (COCO only), "filename": ..., "split": "train|val|test|restval",
"sentences": [{"raw": "A man ...", "tokens": ["a", "man", ...]}, ...], "cocoid": 391895 (COCO only), ...}]}.
The image path is images_dir/filepath/filename. 'restval' (30,504 COCO val2014 images in neither Karpathy
val nor test) joins train by default, as in Karpathy's and most published recipes (113,287 train images).
Image ids are COCO ids for COCO, so results score directly against the official captions_val2014.json.
"""
from __future__ import annotations

from pathlib import Path

from captioner.data.records import ImageRecord, ids_from_names, read_json
from captioner.errors import CaptionerError

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def is_karpathy(data) -> bool:
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def _caption(sentence) -> str:
    """The raw sentence (what coco-caption scores against); the tokens joined when raw is absent."""
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"].strip()
    if isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        return " ".join(map(str, sentence["tokens"])).strip()
    return ""


def read_karpathy(path: str | Path, images_dir: str | Path, restval: str = "train", data=None,
                  encoding: str = "") -> list[ImageRecord]:
    """restval: 'train' (fold into train) or 'drop' (split 'unused'). data: the already-parsed JSON, if any."""
    path = Path(path)
    if data is None:
        data = read_json(path, "Karpathy split file", encoding)
    if not is_karpathy(data):
        raise CaptionerError(f"{path} is not a Karpathy split file (needs an 'images' list whose entries have "
                             f"'filename', 'split' and 'sentences')")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) \
                or not isinstance(img.get("sentences"), list):
            raise CaptionerError(f"{path}: images[{i}] lacks 'filename' or a 'sentences' list")
        if img.get("split") not in KARPATHY_SPLITS:
            raise CaptionerError(f"{path}: images[{i}] ({img['filename']}) has split {img.get('split')!r}; "
                                 f"expected one of {', '.join(KARPATHY_SPLITS)}")
    images = data["images"]
    if all(isinstance(img.get("cocoid"), int) for img in images):
        ids = [img["cocoid"] for img in images]
    else:  # Flickr: the photo id in the file name, as the Flickr8k token reader does
        names = ids_from_names([img["filename"] for img in images])
        ids = [names[img["filename"]] for img in images]
    records = []
    for image_id, img in zip(ids, images):
        split = img["split"] if img["split"] != "restval" else ("train" if restval == "train" else "unused")
        captions = [c for c in map(_caption, img["sentences"]) if c]
        records.append(ImageRecord(image_id, str(Path(images_dir) / img.get("filepath", "") / img["filename"]),
                                   captions, split))
    if len({r.image_id for r in records}) != len(records):
        raise CaptionerError(f"{path}: image ids are not unique")
    return records
