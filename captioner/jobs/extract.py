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
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.engine.compute import autocast, setup_compute
from captioner.config import Config
from captioner.data import load_records
from captioner.data.cache import FeatureCache, default_cache_dir, describe_size, encoder_signature, lock_cache
from captioner.data.pipeline import image_batches
from captioner.errors import CaptionerError
from captioner.model.caption_model import build_encoder
from captioner.engine.runtime import resolve_device, seed_everything

log = logging.getLogger("captioner")

SPLITS = ("train", "val", "test")
COMMIT_EVERY_S = 30.0  # how much work an interruption may lose


def open_for_extraction(folder: Path, signature: dict, dtype: str, rebuild: bool) -> FeatureCache:
    """The cache to append to: the existing one when it matches, a new one when there is none or rebuild."""
    cache = None if rebuild else FeatureCache.load(folder)
    if cache is None:
        return FeatureCache.create(folder, signature, dtype)
    why = cache.mismatch(signature)
    if why:
        raise CaptionerError(f"feature cache {folder} was built with {why}; add --rebuild to replace it, "
                             f"or set cache.dir to another folder")
    if cache.dtype != dtype:
        raise CaptionerError(f"feature cache {folder} stores {cache.dtype}, the config asks for {dtype}; add "
                             f"--rebuild to replace it, or set cache.dtype={cache.dtype}")
    return cache


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CaptionerError(f"feature cache {folder} needs {needed / 1e9:.2f} GB more, only {free / 1e9:.2f} GB free")


def _to_host(features: torch.Tensor, dtype: torch.dtype):
    """Start copying features to the CPU without waiting; returns (CPU tensor, event to wait on or None)."""
    features = features.to(dtype).contiguous()  # convert on the device: half the bytes to move for bfloat16
    if features.device.type != "cuda":
        return features, None
    host = torch.empty(features.shape, dtype=dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _write(cache: FeatureCache, records, features: torch.Tensor, event, failures) -> None:
    """Runs on the writer thread, in submission order, so the index never sees rows out of order."""
    if event is not None:
        event.synchronize()
    if records:
        cache.append(records, features)
    for record, message in failures:
        cache.fail(record, message)


@torch.no_grad()
def extract_into(cache: FeatureCache, encoder, records: list, batch_size: int, num_workers: int,
                 device: torch.device, bf16: bool = False, gpu_decode: bool = False, desc: str = "extract") -> dict:
    """Append the features of every record not yet in cache.

    Returns {"added", "failed", "seconds", "images_per_s", "steady_images_per_s"}; the steady rate leaves out
    the start (worker processes starting, the first batch) that a long run amortises.
    The encoder runs on the main thread while a writer thread copies the previous batch to the host and
    appends it to features.bin, so the GPU never waits for the disk.
    """
    todo = [r for r in records if not cache.has(r)]
    storage_dtype = torch.bfloat16 if cache.dtype == "bfloat16" else torch.float32
    added = failed = 0
    start = last_commit = time.perf_counter()
    steady_start, steady_added = None, 0  # from the end of the first batch on
    batches = image_batches([r.path for r in todo], encoder.image_size, batch_size, num_workers, device, gpu_decode)
    with ThreadPoolExecutor(max_workers=1) as writer, tqdm(total=len(todo), unit="img", desc=desc) as bar:
        pending = deque()
        try:
            for batch in batches:
                images, index, errors = batch.inputs, batch.index, batch.errors
                ok = [j for j, e in enumerate(errors) if not e]
                failures = [(todo[int(index[j])], e) for j, e in enumerate(errors) if e]
                for _, message in failures:
                    log.warning("skipped: %s", message)
                features, event = None, None
                if ok:
                    with autocast(device, bf16):
                        features = encoder(images[ok] if len(ok) < len(errors) else images)  # (b, C, H, W)
                    features, event = _to_host(features, storage_dtype)
                pending.append(writer.submit(_write, cache, [todo[int(index[j])] for j in ok], features, event,
                                             failures))
                while len(pending) > 2:  # at most two batches in flight: memory stays bounded
                    pending.popleft().result()
                added, failed = added + len(ok), failed + len(failures)
                if steady_start is None:
                    steady_start = time.perf_counter()
                else:
                    steady_added += len(ok)
                bar.update(len(errors))
                if time.perf_counter() - last_commit > COMMIT_EVERY_S:
                    pending.append(writer.submit(cache.commit))
                    last_commit = time.perf_counter()
        finally:  # on success, error or Ctrl-C: whatever was written becomes resumable
            for future in pending:
                future.result()
            cache.commit()
    end = time.perf_counter()
    steady = steady_added / (end - steady_start) if steady_added else added / max(end - start, 1e-9)
    return {"added": added, "failed": failed, "seconds": end - start, "images_per_s": added / max(end - start, 1e-9),
            "steady_images_per_s": steady}


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
        _check_disk(folder, todo * cache.row_bytes)
        result = extract_into(cache, encoder, records, batch_size or cfg.decode.batch_size,
                              cfg.train.num_workers if num_workers is None else num_workers, device,
                              compute.bf16, compute.gpu_decode)
    finally:
        cache.close()
    return {"cache": str(folder), "splits": splits, "images": len(cache.rows), "added": result["added"],
            "skipped_existing": len(records) - todo, "failed": result["failed"],
            "images_per_s": round(result["images_per_s"], 2), "seconds": round(result["seconds"], 2),
            "bytes": cache.num_rows * cache.row_bytes, "dtype": cache.dtype}
