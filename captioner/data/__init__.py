"""Dataset readers (all produce ImageRecords), image loading and the torch Datasets."""
from __future__ import annotations

from pathlib import Path

from captioner.config import DatasetConfig
from captioner.data.coco import read_coco
from captioner.data.records import ImageRecord, by_split
from captioner.data.synthetic import generate
from captioner.errors import CaptionerError

__all__ = ["ImageRecord", "by_split", "load_records"]


def load_records(cfg: DatasetConfig) -> list[ImageRecord]:
    """Every image of the configured dataset with its captions and split; synthetic data is generated on first use."""
    if cfg.format == "synthetic":
        root = generate(cfg.root, cfg.synthetic_images, cfg.synthetic_seed, val_fraction=cfg.val_fraction or 0.1)
        return read_coco(root / "captions.json", root / "images", root / "splits.json")
    if cfg.format == "coco":
        if not cfg.annotations:
            raise CaptionerError("dataset.format=coco needs dataset.annotations (a COCO captions JSON)")
        base = Path(cfg.root) if cfg.root else Path(".")
        resolve = lambda p: Path(p) if Path(p).is_absolute() or Path(p).exists() else base / p  # noqa: E731
        images = resolve(cfg.images) if cfg.images else resolve(cfg.annotations).parent
        return read_coco(resolve(cfg.annotations), images, resolve(cfg.splits) if cfg.splits else None,
                         cfg.val_fraction)
    raise CaptionerError(f"unknown dataset.format '{cfg.format}'")
