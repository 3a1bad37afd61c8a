"""The measurements of `captioner bench`, each through the product's own code path (training's step, the
caption pipeline and decode path, extraction into the feature cache), on synthetic JPEGs and random weights."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from captioner.config import Config, EncoderConfig, ModelConfig
from captioner.data.cache import FeatureCache, encoder_signature
from captioner.data.images import CaptionPairs, ImageFiles
from captioner.data.pipeline import Batches
from captioner.data.records import ImageRecord
from captioner.data.synthetic import write_jpegs
from captioner.engine.infer.extraction import extract_into
from captioner.engine.infer.predict import DecodeSettings
from captioner.engine.infer.predictor import Predictor
from captioner.engine.runtime.compute import Compute
from captioner.engine.train.scst import Rewarder, SelfCriticalLoss
from captioner.engine.train.step import CaptionLoss, TrainingStep, build_optimizer
from captioner.errors import CaptionerError
from captioner.jobs.bench.sizes import BenchSizes
from captioner.model.caption_model import CaptionModel, build_encoder
from captioner.model.decoding import SearchOptions, beam_search
from captioner.text import SPECIALS, Vocabulary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def _timed(fn, device: torch.device) -> float:
    """Seconds fn() takes, waiting for the device before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start

def _vocabulary(size: int) -> Vocabulary:
    return Vocabulary(SPECIALS + [f"w{i}" for i in range(size - len(SPECIALS))])

def _records(paths: list[str], sizes: BenchSizes, vocab: Vocabulary, seed: int = 0) -> list[ImageRecord]:
    """One record per JPEG with random captions of COCO-like lengths."""
    rng = np.random.default_rng(seed)
    words = vocab.tokens[len(SPECIALS):]
    records = []
    for i, path in enumerate(paths):
        lengths = rng.integers(max(sizes.caption_words - 3, 1), sizes.caption_words + 4, sizes.captions_per_image)
        captions = [" ".join(words[j] for j in rng.integers(0, len(words), n)) for n in lengths]
        records.append(ImageRecord(i, path, captions, "train"))
    return records

def _train_rate(model, batches: Batches, device: torch.device, steps: int, bf16: bool) -> float:
    """Captions per second over `steps` calls of training's own step (engine/train/step.py: forward, loss, backward,
    unscale, clip at train.grad_clip, AdamW step), after one warm-up step."""
    if len(batches) == 0:
        raise CaptionerError("bench: fewer captions than one training batch; raise extract_images")
    cfg = Config()  # train's defaults: learning rate, weight decay, gradient clipping
    step = TrainingStep(CaptionLoss(model), build_optimizer(model, cfg), cfg.train.grad_clip, device, bf16)
    model.train()
    captions_seen, start, done = 0, 0.0, 0
    while done <= steps:
        for batch in batches:
            step(batch.inputs, batch.captions, batch.lengths)
            if done == 0:  # warm-up done: start the clock
                _sync(device)
                start = time.perf_counter()
            else:
                captions_seen += batch.captions.shape[0]
            done += 1
            if done > steps:
                break
    _sync(device)
    model.eval()
    return captions_seen / (time.perf_counter() - start)

def _scst_rate(loss_fn: SelfCriticalLoss, raw: torch.Tensor, device: torch.device, steps: int,
               bf16: bool) -> tuple[float, float]:
    """(images per second, share of the time spent on rewards) over `steps` calls of training's own step with
    the self-critical loss, after one warm-up step. raw (B, C, H, W): features of the rewarder's images 0..B-1."""
    cfg = Config()  # train's defaults: learning rate, weight decay, gradient clipping
    model = loss_fn.model
    step = TrainingStep(loss_fn, build_optimizer(model, cfg), cfg.train.grad_clip, device, bf16)
    images = torch.arange(raw.shape[0], device=device)
    model.train()
    start, reward_s = 0.0, 0.0
    for done in range(steps + 1):
        step(raw, images)
        if done == 0:  # warm-up done: start the clock
            _sync(device)
            start = time.perf_counter()
        else:
            reward_s += loss_fn.stats["reward_s"]
    _sync(device)
    seconds = time.perf_counter() - start
    model.eval()
    return steps * raw.shape[0] / seconds, reward_s / seconds

def _loader(pairs: CaptionPairs, batch_size: int, num_workers: int, device: torch.device) -> Batches:
    return Batches(pairs, batch_size, device, num_workers, shuffle=True, drop_last=True, persistent_workers=True)

def measure_all(sizes: BenchSizes, compute: Compute, workdir: Path) -> dict:
    """Every measurement of the module docstring, as {key: items per second}, in compute's precision."""
    torch.manual_seed(0)
    device, bf16, gpu_decode = compute.device, compute.bf16, compute.gpu_decode
    encoder_cfg = EncoderConfig(arch=sizes.arch, layer=sizes.layer, image_size=sizes.image_size)
    encoder = compute.prepare_encoder(build_encoder(encoder_cfg))
    vocab = _vocabulary(sizes.vocab_size)
    model = CaptionModel(encoder_cfg, ModelConfig(sizes.embed_dim, sizes.attention_dim, sizes.decoder_dim), len(vocab),
                         encoder=encoder).to(device).eval()
    results = {}

    # (a) the CNN alone
    images = torch.randint(0, 256, (sizes.encoder_batch, 3, sizes.image_size, sizes.image_size), dtype=torch.uint8,
                           device=device)
    batches = max(sizes.encoder_images // sizes.encoder_batch, 1)

    def encode_all(batches=batches):
        with torch.no_grad(), compute.autocast():  # as `captioner extract` runs it
            for _ in range(batches):
                encoder(images)

    encode_all(1)  # warm-up: cuDNN autotuning, torch.compile
    results["encoder_images_per_s"] = batches * sizes.encoder_batch / _timed(encode_all, device)

    # (b) JPEG files -> feature cache, the `captioner extract` path, after a warm-up on a throwaway cache
    paths = write_jpegs(workdir / "jpegs", max(sizes.extract_images, sizes.caption_images), sizes.jpeg_width,
                        sizes.jpeg_height)
    records = _records(paths[: sizes.extract_images], sizes, vocab)
    signature = encoder_signature(encoder)
    warm = FeatureCache.create(workdir / "warmup-cache", signature, sizes.cache_dtype)
    extract_into(warm, encoder, records[: sizes.encoder_batch], sizes.encoder_batch, 0, device, bf16,
                 gpu_decode, desc="warm-up")
    warm.close()
    cache = FeatureCache.create(workdir / "cache", signature, sizes.cache_dtype)
    extracted = extract_into(cache, encoder, records, sizes.encoder_batch, sizes.num_workers, device, bf16,
                             gpu_decode, desc="extract")
    cache.close()
    results["extract_images_per_s"] = extracted["steady_images_per_s"]

    # (c) training steps from the cache and from the images
    source, kept = FeatureCache.load(workdir / "cache").source(records)
    cached_pairs = CaptionPairs(kept, vocab, sizes.max_len, source)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results["train_captions_per_s_cached"] = _train_rate(
        model, _loader(cached_pairs, sizes.train_batch, sizes.num_workers, device), device,
        sizes.train_steps_cached, bf16)
    if device.type == "cuda":
        results["train_cached_peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    image_files = ImageFiles(paths, sizes.image_size, interpolation=encoder.interpolation)
    image_pairs = CaptionPairs(records, vocab, sizes.max_len, image_files)
    results["train_captions_per_s_images"] = _train_rate(
        model, _loader(image_pairs, sizes.train_batch, sizes.num_workers, device), device,
        sizes.train_steps_images, bf16)

    # (d) captioning JPEG files end to end (decode, resize, CNN, decoder), as `captioner caption` does
    caption_paths = paths[: sizes.caption_images]
    for key, beam in (("caption_images_per_s_greedy", 1), ("caption_images_per_s_beam3", sizes.beam_size)):
        predictor = Predictor(model, vocab, Config(encoder=encoder_cfg), compute,
                              DecodeSettings(beam, sizes.max_len, bf16=bf16), source="bench")

        def caption_all(files=caption_paths, predictor=predictor, workers=sizes.num_workers):
            batches = predictor.image_batches(files, sizes.caption_batch, workers)
            for _ in predictor.caption_batches(batches):  # what `captioner caption` runs
                pass

        caption_all(caption_paths[: sizes.caption_batch], workers=0)  # warm-up
        results[key] = len(caption_paths) / _timed(caption_all, device)

    # (e) beam search one image at a time vs all images in one batch, on the same cached features
    raw = source[: sizes.beam_images].to(device)  # (B, C, H, W)
    options = SearchOptions(beam_size=sizes.beam_size, max_len=sizes.max_len)

    def per_image():
        with torch.inference_mode(), compute.autocast():
            for i in range(raw.shape[0]):
                beam_search(model, raw[i:i + 1], options)

    def batched():
        with torch.inference_mode(), compute.autocast():
            beam_search(model, raw, options)

    batched()  # warm-up
    results["beam_per_image_images_per_s"] = raw.shape[0] / _timed(per_image, device)
    results["beam_batched_images_per_s"] = raw.shape[0] / _timed(batched, device)

    # (f) self-critical training steps on cached features, rewarded against random COCO-like references
    extracted = source[: len(kept)]  # (K, C, H, W): repeated up to scst_images
    raw = extracted[torch.arange(sizes.scst_images) % extracted.shape[0]].to(device)
    scst_records = _records([f"scst{i}.jpg" for i in range(sizes.scst_images)], sizes, vocab, seed=1)
    loss_fn = SelfCriticalLoss(model, Rewarder(scst_records, vocab, sizes.max_len), sizes.scst_samples, "mean",
                               sizes.max_len)
    results["train_scst_images_per_s"], results["scst_reward_fraction"] = _scst_rate(
        loss_fn, raw, device, sizes.scst_steps, bf16)
    return results
