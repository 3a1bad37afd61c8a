"""Encoder features of image files appended to the on-disk feature cache (data/cache.py).

    cache = open_for_extraction(folder, encoder_signature(encoder), "bfloat16", rebuild=False)
    summary = extract_into(cache, encoder, records, batch_size=64, num_workers=8, device=device)

`captioner extract`, `bench` and training under torchrun (features shared by every process) call it.
Under torchrun every process appends to its own part cache (part_folder) and rank 0 copies the parts into
the cache (merge_parts).
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from captioner.data.cache import CachedFeatures, FeatureCache, file_identity
from captioner.data.pipeline import Unreadable, image_batches
from captioner.engine.runtime.compute import autocast
from captioner.engine.runtime.distributed import GlobalProgress, Process
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

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


def check_disk(folder: Path, needed: int) -> None:
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
                 device: torch.device, bf16: bool = False, gpu_decode: bool = False, desc: str = "extract",
                 unreadable: Unreadable | None = None, progress: GlobalProgress | None = None) -> dict:
    """Append the features of every record not yet in cache.

    Returns {"added", "failed", "seconds", "images_per_s", "steady_images_per_s"}; the steady rate leaves out
    the start (worker processes starting, the first batch) that a long run amortises. progress, when given,
    is the bar of all processes' work (torchrun); by default the bar counts these records.
    The encoder runs on the main thread while a writer thread copies the previous batch to the host and
    appends it to features.bin, so the GPU never waits for the disk.
    """
    unreadable = unreadable if unreadable is not None else Unreadable()
    todo = [r for r in records if not cache.has(r)]
    storage_dtype = torch.bfloat16 if cache.dtype == "bfloat16" else torch.float32
    added = failed = 0
    start = last_commit = time.perf_counter()
    steady_start, steady_added = None, 0  # from the end of the first batch on
    batches = image_batches([r.path for r in todo], encoder.image_size, batch_size, num_workers, device, gpu_decode,
                            interpolation=encoder.interpolation)
    bar = progress or GlobalProgress(len(todo), Process(0, 1, 0, device), desc)
    with ThreadPoolExecutor(max_workers=1) as writer, bar:
        pending = deque()
        try:
            for batch in batches:
                images, index, errors = batch.inputs, batch.index, batch.errors
                ok = batch.readable()
                failures = [(todo[int(index[j])], e) for j, e in enumerate(errors) if e]
                for _, message in failures:
                    unreadable.add(message)
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


def part_folder(folder: Path, rank: int) -> Path:
    """Where process `rank` of a torchrun run writes its share of the cache in folder."""
    return folder / f"part-{rank:05d}"


def merge_parts(cache: FeatureCache, records: list, discard: bool = False, chunk: int = 256) -> int:
    """Copy the rows and failures of the part caches in cache.folder into cache, in the order of records
    (so a cache merged from N parts equals one written by one process), then delete the parts.

    Rows go in before any part is deleted, and the index is committed before that: a kill in between loses
    nothing, and the next merge skips the images already in cache. A part built with another encoder, or
    damaged, is deleted (its images are extracted again). Returns the number of rows copied.
    """
    folders = sorted(p for p in cache.folder.glob("part-*") if p.is_dir())
    parts = []
    for path in folders:
        try:
            part = None if discard else FeatureCache.load(path)
        except CaptionerError as e:
            log.warning("%s; its images are extracted again", e)
            part = None
        if part is not None and (part.mismatch(cache.header) or part.dtype != cache.dtype):
            log.warning("feature cache part %s was built with other settings; its images are extracted again", path)
            part = None
        if part is not None:
            parts.append(part)
    sources = [CachedFeatures(p.data_path, p.shape, p.dtype, list(range(p.num_rows)), p.num_rows) for p in parts]
    found = []  # (record, part number, row) in records order
    for record in records:
        identity = file_identity(record.path)  # one stat per image, whatever the number of parts
        # _row is the cache's own lookup by identity (has() would stat the file again for every part).
        if identity is None or cache._row(identity) is not None:
            continue
        row, k = next(((row, k) for k, part in enumerate(parts) if (row := part._row(identity)) is not None),
                      (None, None))
        if row is not None:
            found.append((record, k, row))
            continue
        message = next((part.failed[identity[0]] for part in parts if identity[0] in part.failed), None)
        if message is not None:
            cache.fail(record, message)
    for i in range(0, len(found), chunk):
        block = found[i:i + chunk]
        cache.append([r for r, _, _ in block], torch.stack([sources[k][row] for _, k, row in block]))  # (b, C, H, W)
    cache.commit()
    for path in folders:
        shutil.rmtree(path, ignore_errors=True)
    if found:
        log.info("feature cache %s: %d rows merged from %d part caches", cache.folder, len(found), len(parts))
    return len(found)
