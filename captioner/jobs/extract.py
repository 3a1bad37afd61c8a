"""Run the frozen encoder once over a dataset and store its features in an on-disk cache.

    captioner extract --config configs/tiny.yaml                       # train, val and test splits
    captioner extract --config configs/tiny.yaml --split train cache.dtype=float32
    captioner extract --config configs/tiny.yaml --rebuild encoder.layer=layer3 cache.dir=features/l3

Training and evaluation then read the features from the cache instead of running the CNN (see
data/cache.py). The cache goes to cache.dir, by default DATASET_ROOT/features/ARCH-LAYER-SIZE. Images
already in the cache are skipped, so an interrupted run resumes; unreadable images are reported and
skipped. A cache built with other encoder settings or weights is refused unless --rebuild is given.
"""
from __future__ import annotations

import logging
from pathlib import Path

from captioner.engine.compute import setup_compute
from captioner.engine.extraction import check_disk, extract_into, open_for_extraction
from captioner.config import Config
from captioner.data import load_records
from captioner.data.cache import default_cache_dir, describe_size, encoder_signature, lock_cache
from captioner.errors import CaptionerError
from captioner.model.caption_model import build_encoder
from captioner.engine.runtime import resolve_device, seed_everything

log = logging.getLogger("captioner")

SPLITS = ("train", "val", "test")


def main(cfg: Config, splits: str | list[str] = SPLITS, device: str | None = "auto", rebuild: bool = False,
         batch_size: int | None = None, num_workers: int | None = None) -> dict:
    """Extract features of the given splits into the configured cache; returns a summary for the CLI."""
    splits = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise CaptionerError(f"--split {','.join(splits)}: splits are {', '.join(SPLITS)} (comma-separated)")
    if (batch_size is not None and batch_size < 1) or (num_workers is not None and num_workers < 0):
        raise CaptionerError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {num_workers}")
    device = resolve_device(device)
    seed_everything(cfg.train.seed)  # random-init weights come out exactly as training will build them
    compute = setup_compute(cfg.compute, device)
    encoder = compute.prepare_encoder(build_encoder(cfg.encoder))
    records = [r for r in load_records(cfg.dataset) if r.split in splits]
    if not records:
        raise CaptionerError(f"the dataset has no images in split(s) {', '.join(splits)}")
    missing = [r for r in records if not Path(r.path).is_file()]
    if missing:
        log.warning("%d of %d images are missing and skipped (first: %s)", len(missing), len(records), missing[0].path)
        records = [r for r in records if Path(r.path).is_file()]

    folder = default_cache_dir(cfg)
    lock = lock_cache(folder)  # before anything in the folder is read or replaced
    try:
        cache = open_for_extraction(folder, encoder_signature(encoder, cfg.encoder.weights), cfg.cache.dtype, rebuild)
    except BaseException:
        lock.release()
        raise
    cache.lock = lock  # released by cache.close()
    try:
        todo = sum(not cache.has(r) for r in records)
        log.info("feature cache %s: adding %s; %d images already there", folder,
                 describe_size(todo, cache.shape, cache.dtype), len(records) - todo)
        check_disk(folder, todo * cache.row_bytes)
        result = extract_into(cache, encoder, records, batch_size or cfg.decode.batch_size,
                              cfg.train.num_workers if num_workers is None else num_workers, device,
                              compute.bf16, compute.gpu_decode)
    finally:
        cache.close()
    return {"cache": str(folder), "splits": splits, "images": len(cache.rows), "added": result["added"],
            "skipped_existing": len(records) - todo, "failed": result["failed"],
            "images_per_s": round(result["images_per_s"], 2), "seconds": round(result["seconds"], 2),
            "bytes": cache.num_rows * cache.row_bytes, "dtype": cache.dtype}
