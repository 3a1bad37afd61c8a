"""Dataset readers (all produce ImageRecords), image loading and the torch Datasets.

    records = load_records(cfg.dataset)           # every image with its captions and split, missing files dropped
    train = by_split(records, "train")

dataset.format picks the reader; `auto` (the default) tells them apart by the annotations file's content:

    synthetic   generated shapes (no annotations file needed)
    coco        COCO captions JSON               captions_train2014.json           (coco.py, pycocotools)
    karpathy    Karpathy split JSON              dataset_coco.json, dataset_flickr8k.json (karpathy.py)
    flickr8k    Flickr token file + split lists  Flickr8k.token.txt, results_20130124.token (flickr.py)
    csv         header + one row per caption     image,caption (Kaggle's captions.txt)   (csv.py)
    jsonl       one JSON object per line         {"image": ..., "caption": ...}          (jsonl.py)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from captioner.config import DATASET_FORMATS as FORMATS
from captioner.config import DatasetConfig
from captioner.data.coco import read_coco
from captioner.data.csv import read_csv, table_columns
from captioner.data.flickr import flickr8k_split_lists, is_flickr_tokens, read_flickr_tokens
from captioner.data.jsonl import read_jsonl
from captioner.data.karpathy import is_karpathy, read_karpathy
from captioner.data.records import (SPLITS, ImageRecord, by_split, check_unique, drop_missing, drop_wordless,
                                    file_lines, read_json, read_text, split_by_fraction, split_from_ids_file,
                                    split_from_name_lists)
from captioner.data.synthetic import generate
from captioner.errors import CaptionerError

__all__ = ["ImageRecord", "by_split", "load_records", "read_dataset", "detect_format", "annotations_path", "FORMATS"]

log = logging.getLogger("captioner")


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def detect_format(path: Path, encoding: str = "") -> tuple[str, object]:
    """(format, parsed JSON or None) from the annotations file's content, never from its name alone:
    Kaggle's Flickr8k captions.txt is a CSV while Flickr8k.token.txt is a token file."""
    if not path.is_file():
        raise CaptionerError(f"annotations file {path} not found")
    head = read_text(path, "annotations file", encoding, limit=4096)  # a byte-order mark is dropped here
    first_line = next((line for line in file_lines(head) if line.strip()), "")
    if head.lstrip().startswith("{") and path.suffix.lower() != ".jsonl":
        try:
            data = read_json(path, "annotations file", encoding)
        except CaptionerError:
            if _is_json_object(first_line):  # one object per line under a .json name
                return "jsonl", None
            raise
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return "coco", data
        if is_karpathy(data):
            return "karpathy", data
        raise CaptionerError(f"annotations file {path}: a JSON file that is neither COCO captions format "
                             f"('images' + 'annotations') nor a Karpathy split file ('images' with 'sentences')")
    if first_line.lstrip().startswith("{"):
        return "jsonl", None
    if is_flickr_tokens(first_line):
        return "flickr8k", None
    if table_columns(first_line):
        return "csv", None
    raise CaptionerError(f"cannot tell the format of {path} (first line: {first_line[:80]!r}); "
                         f"set dataset.format to one of {', '.join(FORMATS[1:])}")


def _resolver(cfg: DatasetConfig):
    """Paths in the config: as given when absolute or present, else relative to dataset.root when present there;
    a path found in neither place stays as written, so the error names what the user wrote."""
    base = Path(cfg.root) if cfg.root else Path(".")

    def resolve(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() or Path(p).exists() or not (base / p).exists() else base / p
    return resolve


def annotations_path(cfg: DatasetConfig) -> Path:
    """The annotations file as the readers find it (relative paths tried against dataset.root too)."""
    return _resolver(cfg)(cfg.annotations)


def read_dataset(cfg: DatasetConfig) -> tuple[str, list[ImageRecord]]:
    """(format used, records with splits assigned). No file checks: see load_records."""
    if cfg.format == "synthetic" or (cfg.format == "auto" and not cfg.annotations):
        root = generate(cfg.root, cfg.synthetic_images, cfg.synthetic_seed, val_fraction=cfg.val_fraction or 0.1)
        records = read_coco(root / "captions.json", root / "images")
        check_unique(records, f"synthetic dataset {root}")
        split_from_ids_file(records, root / "splits.json")
        return "synthetic", records
    if not cfg.annotations:
        raise CaptionerError(f"dataset.format={cfg.format} needs dataset.annotations (the captions file)")
    resolve = _resolver(cfg)
    annotations = resolve(cfg.annotations)
    images = resolve(cfg.images) if cfg.images else annotations.parent
    enc = cfg.encoding
    fmt, data = detect_format(annotations, enc) if cfg.format == "auto" else (cfg.format, None)
    if fmt == "coco":
        records = read_coco(annotations, images, data, enc)
    elif fmt == "karpathy":
        records = read_karpathy(annotations, images, cfg.restval, data, enc)
    elif fmt in ("flickr8k", "flickr30k"):
        records = read_flickr_tokens(annotations, images, enc)
    elif fmt == "csv":
        records = read_csv(annotations, images, enc)
    elif fmt == "jsonl":
        records = read_jsonl(annotations, images, enc)
    else:
        raise CaptionerError(f"unknown dataset.format '{fmt}'; valid: {', '.join(FORMATS)}")
    drop_wordless(records, f"annotations file {annotations}")
    check_captioned(records, f"annotations file {annotations}")
    check_unique(records, f"annotations file {annotations}")
    _assign_splits(records, cfg, annotations, resolve)
    return fmt, records


def check_captioned(records: list[ImageRecord], source: str) -> None:
    """Refuse a dataset without a single caption; report the images that have none (they are not used)."""
    uncaptioned = [r for r in records if not r.captions]
    if len(uncaptioned) == len(records):
        raise CaptionerError(f"{source} holds no captions" + (f" ({len(records)} images, none with a caption)"
                                                             if records else " (no images either)"))
    if uncaptioned:
        log.warning("%s: %d of %d images have no caption and are not used (first: %s)", source, len(uncaptioned),
                    len(records), uncaptioned[0].path)


def _assign_splits(records: list[ImageRecord], cfg: DatasetConfig, annotations: Path, resolve) -> None:
    """Explicit split files win; else splits the file brings (Karpathy, a CSV split column) are kept; else the
    Flickr8k lists next to the annotations file; else dataset.val_fraction of the images go to val and to test."""
    lists = {s: resolve(p) for s, p in (("train", cfg.train_list), ("val", cfg.val_list), ("test", cfg.test_list))
             if p}
    if cfg.splits:
        split_from_ids_file(records, resolve(cfg.splits))
    elif lists:
        split_from_name_lists(records, lists, cfg.encoding)
    elif all(not r.split for r in records) and flickr8k_split_lists(annotations):
        split_from_name_lists(records, flickr8k_split_lists(annotations), cfg.encoding)
    elif any(not r.split for r in records):
        split_by_fraction([r for r in records if not r.split], cfg.val_fraction)


def load_records(cfg: DatasetConfig) -> list[ImageRecord]:
    """Every image of the configured dataset's train, val and test splits with its captions; synthetic data is
    generated on first use. Images whose file is missing are reported and left out (an error above
    dataset.max_missing_fraction); images in no split are left out."""
    _, records = read_dataset(cfg)
    records = [r for r in records if r.split in SPLITS]
    return drop_missing(records, cfg.max_missing_fraction, f"dataset {cfg.annotations or cfg.root}")


def dataset_inputs(cfg: DatasetConfig) -> tuple[dict, dict]:
    """(files, folders) a command reading this dataset reads, named by their keys, for io_paths.refuse_overlap:
    the captions file and split files (never to be replaced), the image folder and a synthetic set's root (an
    output may go beside their files, never replace the folder). Nothing is read here."""
    if cfg.format == "synthetic" or (cfg.format == "auto" and not cfg.annotations):
        return {}, {"dataset.root": cfg.root or "."}
    resolve = _resolver(cfg)
    annotations = resolve(cfg.annotations)
    files = {"dataset.annotations": annotations}
    files.update({f"dataset.{key}": resolve(getattr(cfg, key))
                  for key in ("splits", "train_list", "val_list", "test_list") if getattr(cfg, key)})
    if annotations.is_file() and not any(getattr(cfg, k) for k in ("splits", "train_list", "val_list", "test_list")):
        found = flickr8k_split_lists(annotations) or {}
        files.update({f"Flickr8k {split} list": path for split, path in found.items()})
    return files, {"dataset.images": resolve(cfg.images) if cfg.images else annotations.parent}
