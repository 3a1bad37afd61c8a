"""The one internal form every dataset reader produces: an image file with its captions and split."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ImageRecord:
    image_id: int
    path: str  # absolute or relative to the working directory
    captions: list[str] = field(default_factory=list)
    split: str = "train"  # train | val | test


def by_split(records: list[ImageRecord], split: str) -> list[ImageRecord]:
    return [r for r in records if r.split == split]
