"""A few training steps and captions on the real COCO photos and annotation file in ../shared (if present)."""
import json

import pytest

from captioner.jobs import caption, train
from captioner.config import load_config

from helpers import COCO_MINI, TINY

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"{COCO_MINI} not present")]


def test_train_and_caption_real_photos(tmp_path):
    cfg = load_config(TINY, [
        "dataset.format=coco", f"dataset.annotations={COCO_MINI}/annotations/captions_train2017.json",
        f"dataset.images={COCO_MINI}/train2017", "dataset.val_fraction=0.1", "dataset.min_freq=2",
        "train.epochs=2", "train.num_workers=0", "train.precompute_features=false", "train.batch_size=32",
        "encoder.image_size=96"])
    summary = train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    assert summary["steps"] == 2 * (64 * 5 // 32)
    result = caption.main(caption.CaptionJob(summary["best_checkpoint"], [str(COCO_MINI / "train2017")], out=str(tmp_path / "c.jsonl"),
                          beam_size=2, device="cpu", num_workers=0))
    records = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert result["captioned"] == 80 == len(records) and result["errors"] == 0
    assert all(r["caption"] for r in records)
