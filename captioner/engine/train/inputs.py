"""Where training's inputs come from: the feature cache, features computed once per image, or image files.

    inputs = training_inputs(cfg, model, train_records, val_records, process)
    loader, sampler = build_train_loader(cfg, vocab, inputs, process)    # device batches (data/pipeline.py)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from captioner.config import Config
from captioner.data.cache import cached_training_inputs
from captioner.data.images import CaptionPairs, ImageFiles
from captioner.data.pipeline import Batches, Unreadable, image_batches
from captioner.data.sampler import ResumableSampler
from captioner.engine.runtime.compute import Compute, autocast
from captioner.engine.runtime import distributed
from captioner.engine.runtime.distributed import Process
from captioner.model.caption_model import CaptionModel
from captioner.errors import CaptionerError
from captioner.progress import bar as make_bar
from captioner.text import SPECIALS, Vocabulary

log = logging.getLogger("captioner")


@torch.no_grad()
def extract_features(model: CaptionModel, records, batch_size: int, num_workers: int, device, gpu_decode: bool,
                     unreadable: Unreadable, desc: str = "features", progress_bar: bool = True, bf16: bool = False):
    """Run the frozen encoder once over records -> (float32 (N, C, H, W) on CPU, records kept).
    Unreadable images are reported, counted and dropped. bf16: autocast (the resolved compute.bf16)."""
    batches = image_batches([r.path for r in records], model.encoder.image_size, batch_size, num_workers, device,
                            gpu_decode, interpolation=model.encoder.interpolation)
    chunks, keep = [], []
    for batch in make_bar(batches, desc=desc, unit="batch", leave=False, disable=not progress_bar):
        good = batch.readable()
        for e in filter(None, batch.errors):
            unreadable.add(e)
        if good:
            with autocast(device, bf16):
                chunks.append(model.encode(batch.inputs[good]).float().cpu())
            keep.extend(int(batch.index[j]) for j in good)
    if not chunks:
        return torch.empty(0), []
    return torch.cat(chunks), [records[i] for i in keep]


def extract_shared(model: CaptionModel, records, process: Process, *args, **kwargs):
    """extract_features over records, computed once across torchrun's processes: each encodes every N-th
    image, rank 0 puts the pieces back in record order and every process receives the whole set (instead of
    each process encoding every image). One process: extract_features itself."""
    if not process.distributed:
        return extract_features(model, records, *args, **kwargs)
    mine = list(range(process.rank, len(records), process.world_size))
    features, kept = extract_features(model, [records[i] for i in mine], *args, **kwargs)
    position = {id(records[i]): i for i in mine}
    parts = distributed.gather_to_main(([position[id(r)] for r in kept], features), process)
    if process.is_main:
        order = [i for indices, _ in parts for i in indices]
        chunks = [f for _, f in parts if len(f)]
        stacked = torch.cat(chunks) if chunks else torch.empty(0)
        sort = sorted(range(len(order)), key=order.__getitem__)
        parts = ([order[j] for j in sort], stacked[sort] if len(sort) else stacked)
    indices, features = distributed.broadcast_from_main(parts, process)
    return features, [records[i] for i in indices]


@dataclass
class TrainingInputs:
    """Where the training and validation inputs come from."""
    train_source: object  # train_source[i] -> input of train_records[i]: image (3, S, S) uint8 or features (C, H, W)
    train_records: list
    val_features: object  # (N, C, H, W) tensor or cache source for val_records, or None: read the images
    val_records: list  # this process's share of the val images
    num_workers: int
    unreadable: Unreadable  # images skipped because they could not be read


def training_inputs(cfg: Config, model: CaptionModel, train_records, val_records, process: Process,
                    compute: Compute) -> TrainingInputs:
    """Choose the input source: encoder features computed once per image (a frozen encoder gives the same ones
    every epoch) or image files read per batch. One place, so that a feature cache can take over."""
    val_records = val_records[process.rank::process.world_size]  # validation is split across processes
    unreadable, gpu_decode = Unreadable(), compute.gpu_decode
    cached = None if cfg.encoder.finetune_from else cached_training_inputs(cfg, model.encoder, train_records, val_records)
    if cached is not None:  # memory-mapped feature cache: workers read only the rows each batch needs
        train_source, train_records, val_features, val_records = cached
        return TrainingInputs(train_source, train_records, val_features, val_records, cfg.train.num_workers,
                              unreadable)
    precompute = cfg.train.precompute_features
    if precompute and cfg.encoder.finetune_from:
        log.info("encoder.finetune_from=%s: the encoder changes while training, so its features are computed "
                 "per batch (train.precompute_features ignored)", cfg.encoder.finetune_from)
        precompute = False
    if not precompute:
        source = ImageFiles([r.path for r in train_records], model.encoder.image_size, gpu_decode=gpu_decode,
                            interpolation=model.encoder.interpolation)
        return TrainingInputs(source, train_records, None, val_records, cfg.train.num_workers, unreadable)
    device, bar = process.device, process.is_main
    batch_size, num_workers = cfg.compute.encode_batch_size, cfg.compute.num_workers
    # every process trains on all of them: encoded once across the processes (val is already split per process)
    train_features, train_records = extract_shared(model, train_records, process, batch_size, num_workers, device,
                                                   gpu_decode, unreadable, "train features", bar, compute.bf16)
    val_features, val_records = extract_features(model, val_records, batch_size, num_workers,
                                                 device, gpu_decode, unreadable, "val features", bar, compute.bf16)
    return TrainingInputs(train_features, train_records, val_features, val_records, 0, unreadable)  # in memory


def build_train_loader(cfg: Config, vocab: Vocabulary, inputs: TrainingInputs,
                       process: Process) -> tuple[Batches, ResumableSampler]:
    # SCST samples its own captions: one item per image (Batch.index gives its record, for the rewards)
    pairs = CaptionPairs(inputs.train_records, vocab, cfg.dataset.max_len, inputs.train_source,
                         per_image=cfg.train.objective == "scst")
    sampler = ResumableSampler(len(pairs), cfg.train.seed, process.rank, process.world_size)
    per_process = -(-len(pairs) // process.world_size)
    loader = Batches(pairs, cfg.train.batch_size, process.device, inputs.num_workers, sampler=sampler,
                     drop_last=per_process > cfg.train.batch_size, seed=cfg.train.seed, unreadable=inputs.unreadable)
    return loader, sampler


# Below these, training runs but can hardly learn anything useful: say so before the first step.
FEW_TRAIN_IMAGES, FEW_VAL_IMAGES, FEW_WORDS = 100, 10, 20


def check_training_data(train_records, val_records, vocab: Vocabulary, cfg: Config) -> None:
    """Refuse data no model can be selected or trained on; warn when it is too small to learn much."""
    if not val_records:
        raise CaptionerError("the val split is empty, so no checkpoint could be selected (every validation would "
                             "score 0): set dataset.val_fraction (e.g. 0.1), or give val images in dataset.splits "
                             "or dataset.val_list")
    if len(vocab) <= len(SPECIALS):
        raise CaptionerError(f"the training captions give no word seen at least dataset.min_freq="
                             f"{cfg.dataset.min_freq} times, so the vocabulary holds only {', '.join(SPECIALS)}: "
                             f"lower dataset.min_freq, or check that the captions column holds text")
    for count, few, what in ((len(train_records), FEW_TRAIN_IMAGES, "training images"),
                             (len(val_records), FEW_VAL_IMAGES, "validation images"),
                             (len(vocab) - len(SPECIALS), FEW_WORDS, "words in the vocabulary")):
        if count < few:
            log.warning("WARNING: only %d %s (fewer than %d): the model will learn little and its scores will "
                        "be noise", count, what, few)
