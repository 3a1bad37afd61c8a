"""Run the frozen encoder once over a dataset and store its features in an on-disk cache.

    captioner extract --config configs/tiny.yaml                       # train, val and test splits
    captioner extract --config configs/tiny.yaml --split train cache.dtype=float32
    captioner extract --config configs/tiny.yaml --rebuild encoder.layer=layer3 cache.dir=features/l3

Training and evaluation then read the features from the cache instead of running the CNN (see
data/cache.py). The cache goes to cache.dir, by default DATASET_ROOT/features/ARCH-LAYER-SIZE. Images
already in the cache are skipped, so an interrupted run resumes; unreadable images are reported and
skipped. A cache built with other encoder settings or weights is refused unless --rebuild is given.

    torchrun --nproc_per_node=8 -m captioner extract --config configs/coco_resnet152.yaml

Under torchrun every process extracts its shard of the missing images on its own device into a part cache
(CACHE/part-00003 for rank 3); rank 0 then copies the parts into the cache in dataset order, so the cache
equals a one-process one. Parts a killed run left are taken in when the next run starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from captioner.engine.runtime.compute import setup_compute
from captioner.engine.infer.extraction import check_disk, extract_into, merge_parts, open_for_extraction, part_folder
from captioner.config import Config, require_min
from captioner.data.datasets import dataset_inputs, load_records
from captioner.data.pipeline import Unreadable
from captioner.data.cache import FeatureCache, default_cache_dir, describe_size, encoder_signature, lock_cache
from captioner.errors import CaptionerError
from captioner.files import check_writable
from captioner.io_paths import refuse_overlap
from captioner.jobs.base import config_of
from captioner.model.caption_model import build_encoder
from captioner.model.pretrained import names_library_weights
from captioner.engine.runtime import distributed
from captioner.engine.runtime.distributed import Process

log = logging.getLogger("captioner")

SPLITS = ("train", "val", "test")


@dataclass
class ExtractJob:
    """`captioner extract`'s options."""
    cfg: Config | None = None  # None: read from config (+ overrides)
    splits: str | list[str] = SPLITS  # "train,val" or a list
    device: str | None = "auto"
    rebuild: bool = False  # replace a cache built with other encoder settings
    batch_size: int | None = None  # None: compute.encode_batch_size
    num_workers: int | None = None  # None: compute.num_workers
    config: str | None = None  # a YAML config file
    overrides: list[str] = field(default_factory=list)  # section.key=value on top of config

    def __post_init__(self):
        require_min(("--batch-size", self.batch_size, 1), ("--workers", self.num_workers, 0))
        self.cfg = config_of(self.cfg, self.config, self.overrides, "extract")
        splits = self.splits
        self.splits = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else list(splits)
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise CaptionerError(f"--split {','.join(self.splits)}: splits are {', '.join(SPLITS)} (comma-separated)")
        files, folders = dataset_inputs(self.cfg.dataset)  # --rebuild empties the cache: never an input in it
        refuse_overlap({"cache.dir": default_cache_dir(self.cfg)},
                       {"--config": self.config, "encoder.weights": self.cfg.encoder.weights, **files}, folders)


def main(job: ExtractJob) -> dict:
    """Extract features of the given splits into the configured cache; returns a summary for the CLI
    (over all processes on rank 0 under torchrun, this process's share elsewhere)."""
    cfg, splits = job.cfg, job.splits
    process = distributed.setup(job.device, distributed.LONG_WAIT)  # cuda:LOCAL_RANK under torchrun
    try:
        return _extract(cfg, splits, process, job.rebuild, job.batch_size or cfg.compute.encode_batch_size,
                        cfg.compute.num_workers if job.num_workers is None else job.num_workers)
    finally:
        distributed.cleanup(process)


def _extract(cfg: Config, splits: list[str], process: Process, rebuild: bool, batch_size: int,
             num_workers: int) -> dict:
    device = process.device
    read_only = None  # the refusal of a cache this process cannot write, if it must write to it
    if process.is_main:
        try:
            check_writable(default_cache_dir(cfg), "feature cache", folder=True)  # before the encoder and the dataset
        except CaptionerError as e:
            if rebuild or process.distributed or not (default_cache_dir(cfg) / "header.json").is_file():
                raise  # nothing there to use as it is: refused before any work
            read_only = e  # another user's shared cache, maybe complete: decided once the images are known
    compute = setup_compute(cfg.compute, device)
    # One process per node downloads the pretrained weights into the node's cache; the others read them there.
    with distributed.node_main_first(process, "fetching encoder.weights", names_library_weights(cfg.encoder.weights)):
        encoder = compute.prepare_encoder(build_encoder(cfg.encoder))
    with distributed.main_process_first(process):  # a synthetic set is generated once, not by every process
        all_records = load_records(cfg.dataset)
    records = [r for r in all_records if r.split in splits]
    if not records:
        raise CaptionerError(f"the dataset has no images in split(s) {', '.join(splits)}")
    missing = [r for r in records if not Path(r.path).is_file()]
    if missing:
        log.warning("%d of %d images are missing and skipped (first: %s)", len(missing), len(records), missing[0].path)
        records = [r for r in records if Path(r.path).is_file()]

    folder = default_cache_dir(cfg, encoder.layer)
    signature = encoder_signature(encoder, cfg.encoder.weights)
    if read_only is not None:
        return _complete_or_refuse(folder, signature, cfg.cache.dtype, records, splits, read_only)
    cache, todo = None, None
    try:
        if process.is_main:
            lock = lock_cache(folder)  # before anything in the folder is read or replaced
            try:
                cache = open_for_extraction(folder, signature, cfg.cache.dtype, rebuild)
            except BaseException:
                lock.release()
                raise
            cache.lock = lock  # released by cache.close()
            merge_parts(cache, all_records, discard=rebuild)  # what a killed torchrun run finished is kept
            todo = [i for i, r in enumerate(records) if not cache.has(r)]
            log.info("feature cache %s: adding %s; %d images already there", folder,
                     describe_size(len(todo), cache.shape, cache.dtype), len(records) - len(todo))
            check_disk(folder, len(todo) * cache.row_bytes * (2 if process.distributed else 1))  # + the parts
        todo = distributed.broadcast_from_main(todo, process)
        mine = [records[i] for i in distributed.shard(todo, process)]
        # One process writes the cache itself; under torchrun each writes its own part, merged by rank 0 below.
        writer = (FeatureCache.create(part_folder(folder, process.rank), signature, cfg.cache.dtype)
                  if process.distributed else cache)
        progress = distributed.GlobalProgress(len(todo), process, "extract")  # rank 0 shows all processes' images
        unreadable = Unreadable()  # each warns as it goes; only rank 0's voice is heard (distributed.setup)
        try:
            result = extract_into(writer, encoder, mine, batch_size, num_workers, device, compute.bf16,
                                  compute.gpu_decode, unreadable=unreadable, progress=progress)
        finally:
            writer.close()
        everyone = distributed.gather_to_main(result, process)  # sent once this process's part is closed
        distributed.name_on_main(unreadable, process)  # the summary's "failed" counts them all
        if not process.is_main:
            return {"cache": str(folder), "rank": process.rank, "added": result["added"], "failed": result["failed"]}
        if process.distributed:
            merge_parts(cache, all_records)
    finally:
        if cache is not None:
            cache.close()
    added, failed = sum(r["added"] for r in everyone), sum(r["failed"] for r in everyone)
    seconds = max(r["seconds"] for r in everyone)
    return {"cache": str(folder), "splits": splits, "images": len(cache.rows), "added": added,
            "skipped_existing": len(records) - len(todo), "failed": failed, "processes": process.world_size,
            "images_per_s": round(added / max(seconds, 1e-9), 2), "seconds": round(seconds, 2),
            "bytes": cache.num_rows * cache.row_bytes, "dtype": cache.dtype}


def _complete_or_refuse(folder: Path, signature: dict, dtype: str, records: list, splits: list[str],
                        refusal: CaptionerError) -> dict:
    """A cache this process cannot write (another user's shared one, read-only here): the summary when it already
    holds every image of the splits, as built by this encoder, with nothing to add; else the refusal."""
    cache = FeatureCache.load(folder)
    if cache is None or cache.mismatch(signature) or cache.dtype != dtype or not all(cache.has(r) for r in records):
        raise refusal
    log.info("feature cache %s: nothing to add, all %d images already there (the folder is read-only here)", folder,
             len(records))
    return {"cache": str(folder), "splits": splits, "images": len(cache.rows), "added": 0,
            "skipped_existing": len(records), "failed": 0, "processes": 1, "images_per_s": 0.0, "seconds": 0.0,
            "bytes": cache.num_rows * cache.row_bytes, "dtype": cache.dtype}

