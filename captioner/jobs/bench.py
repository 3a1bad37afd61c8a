"""Measure how fast captioner runs on this machine, on synthetic photo-like JPEGs of realistic size.

    captioner bench --device cpu --json bench.json     # ResNet-18 at 224: about a minute on 2 CPU cores
    captioner bench --device cuda --full               # ResNet-152 at 224, 640x480 JPEGs, COCO recipe sizes
    captioner bench --smoke                            # tiny sizes: checks that everything runs (seconds)
    captioner bench --device cpu arch=resnet152 train_steps_images=1   # any BenchSizes field=value

Each number is items per second over a timed run that follows a warm-up run (cuDNN autotuning and
torch.compile happen in the warm-up):
    encoder_images_per_s           the frozen CNN alone, on uint8 batches already on the device
    extract_images_per_s           `captioner extract`: JPEG files -> decode, resize, CNN -> feature cache
                                   (after the first batch: worker start-up is left out)
    train_captions_per_s_cached    training steps fed from the feature cache
    train_captions_per_s_images    training steps running the CNN on every caption's image
    caption_images_per_s_greedy    captioning JPEG files end to end, greedy (worker start-up included)
    caption_images_per_s_beam3     the same with beam size 3
    beam_per_image_images_per_s    beam 3 on cached features, one image at a time
    beam_batched_images_per_s      beam 3 on the same features, all of them in one batch
    train_scst_images_per_s        self-critical training steps (the same step, SelfCriticalLoss) on cached
                                   features: scst_images images x scst_samples sampled captions, CIDEr-D
                                   rewards, mean baseline (scst_reward_fraction: the share spent on rewards)
The decoder is untrained, so captions run to decode max_len words: the slowest case for decoding.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml

from captioner import __version__
from captioner.model.decoding import beam_search
from captioner.engine.runtime.compute import Compute, cpu_capability, setup_compute
from captioner.config import ComputeConfig, Config, EncoderConfig, ModelConfig, Switch, coerce, require_min
from captioner.data.cache import FeatureCache, encoder_signature
from captioner.data.images import CaptionPairs, ImageFiles
from captioner.data.records import ImageRecord
from captioner.errors import CaptionerError
from captioner.data.synthetic import write_jpegs
from captioner.files import write_json
from captioner.data.pipeline import Batches, image_batches
from captioner.engine.infer.predict import DecodeSettings, caption_batches
from captioner.engine.infer.extraction import extract_into
from captioner.engine.train.scst import Rewarder, SelfCriticalLoss
from captioner.engine.train.step import CaptionLoss, TrainingStep, build_optimizer
from captioner.model.caption_model import CaptionModel, build_encoder
from captioner.engine.runtime.device import resolve_device
from captioner.text import SPECIALS, Vocabulary

log = logging.getLogger("captioner")

KEYS = ("encoder_images_per_s", "extract_images_per_s", "train_captions_per_s_cached",
        "train_captions_per_s_images", "caption_images_per_s_greedy", "caption_images_per_s_beam3",
        "beam_per_image_images_per_s", "beam_batched_images_per_s", "train_scst_images_per_s")


@dataclass
class BenchSizes:
    arch: str = "resnet18"
    layer: str = "layer4"
    image_size: int = 224
    jpeg_width: int = 640  # synthetic JPEGs are COCO-sized photos
    jpeg_height: int = 480
    embed_dim: int = 512  # Show, Attend and Tell's COCO recipe
    attention_dim: int = 512
    decoder_dim: int = 512
    vocab_size: int = 10000  # COCO's vocabulary at min_freq 5 is about 10k words
    caption_words: int = 11  # mean words per COCO caption (lengths vary +-3 around it)
    captions_per_image: int = 5
    max_len: int = 20  # decoding length limit
    encoder_batch: int = 16
    encoder_images: int = 32
    extract_images: int = 48  # also the images training and beam search read from the cache
    train_batch: int = 32
    train_steps_cached: int = 10
    train_steps_images: int = 2
    caption_images: int = 32
    caption_batch: int = 32
    beam_size: int = 3
    beam_images: int = 32  # per-image vs batched beam: one batch of this many images
    scst_images: int = 64  # SCST: images per step (cached features, repeated when fewer were extracted)
    scst_samples: int = 5  # SCST: captions sampled per image
    scst_steps: int = 2
    num_workers: int = 2
    cache_dtype: str = "bfloat16"
    bf16: Switch = "auto"  # auto | true | false, as compute.bf16: on CUDA and on CPUs with native bf16
    channels_last: Switch = "auto"  # as compute.channels_last
    compile: bool = False
    gpu_decode: bool = False  # CUDA only


PRESETS = {
    "default": BenchSizes(),
    "smoke": BenchSizes(image_size=64, jpeg_width=96, jpeg_height=72, embed_dim=32, attention_dim=32,
                        decoder_dim=32, vocab_size=60, caption_words=6, captions_per_image=2, max_len=6,
                        encoder_batch=4, encoder_images=8, extract_images=8, train_batch=4, train_steps_cached=2,
                        train_steps_images=1, caption_images=4, caption_batch=4, beam_images=4, num_workers=0,
                        scst_images=4, scst_samples=2, scst_steps=1),
    "full": BenchSizes(arch="resnet152", encoder_batch=256, encoder_images=4096, extract_images=4096,
                       train_batch=256, train_steps_cached=200, train_steps_images=8, caption_images=8192,
                       caption_batch=256, num_workers=min(16, os.cpu_count() or 1), compile=True, gpu_decode=True),
}


def apply_overrides(sizes: BenchSizes, overrides: list[str]) -> BenchSizes:
    """`field=value` strings (arch=resnet152 train_batch=64) on top of sizes; unknown fields are errors."""
    types = typing.get_type_hints(BenchSizes)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in types:
            raise CaptionerError(f"bench override '{item}' is not field=value with a field among: {', '.join(types)}")
        value = yaml.safe_load(raw)
        if typing.get_origin(types[key]) is typing.Literal:  # bf16=false, channels_last=auto, ...
            value = coerce(key, value, types[key])
            setattr(sizes, key, value)
            continue
        if types[key] is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, types[key]) or (types[key] is int and isinstance(value, bool)):
            raise CaptionerError(f"bench override {key} expects {types[key].__name__}, got {raw!r}")
        setattr(sizes, key, value)
    positive = [f.name for f in dataclasses.fields(sizes) if types[f.name] is int and getattr(sizes, f.name) < 1
                and f.name != "num_workers"]
    if positive or sizes.num_workers < 0:
        raise CaptionerError(f"bench sizes must be >= 1 (num_workers >= 0): {', '.join(positive) or 'num_workers'}")
    if sizes.beam_images > sizes.extract_images:
        raise CaptionerError(f"bench beam_images ({sizes.beam_images}) must be <= extract_images "
                             f"({sizes.extract_images}): beam search reads the extracted features")
    return sizes


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


def run(sizes: BenchSizes, compute: Compute, workdir: Path) -> dict:
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
    image_pairs = CaptionPairs(records, vocab, sizes.max_len, ImageFiles(paths, sizes.image_size))
    results["train_captions_per_s_images"] = _train_rate(
        model, _loader(image_pairs, sizes.train_batch, sizes.num_workers, device), device,
        sizes.train_steps_images, bf16)

    # (d) captioning JPEG files end to end (decode, resize, CNN, decoder), as `captioner caption` does
    caption_paths = paths[: sizes.caption_images]
    for key, beam in (("caption_images_per_s_greedy", 1), ("caption_images_per_s_beam3", sizes.beam_size)):
        settings = DecodeSettings(beam, sizes.max_len, bf16=bf16)

        def caption_all(files=caption_paths, settings=settings, workers=sizes.num_workers):
            batches = image_batches(files, sizes.image_size, sizes.caption_batch, workers, device, gpu_decode)
            for _ in caption_batches(model, vocab, batches, settings):  # what `captioner caption` runs
                pass

        caption_all(caption_paths[: sizes.caption_batch], workers=0)  # warm-up
        results[key] = len(caption_paths) / _timed(caption_all, device)

    # (e) beam search one image at a time vs all images in one batch, on the same cached features
    raw = source[: sizes.beam_images].to(device)  # (B, C, H, W)

    def per_image():
        with torch.inference_mode(), compute.autocast():
            for i in range(raw.shape[0]):
                beam_search(model, raw[i:i + 1], sizes.beam_size, sizes.max_len)

    def batched():
        with torch.inference_mode(), compute.autocast():
            beam_search(model, raw, sizes.beam_size, sizes.max_len)

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


def _device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {threads} threads"


def main(device: str | None = "auto", preset: str = "default", json_path: str | None = None,
         sizes: BenchSizes | None = None, compile: bool | None = None, threads: int | None = None,
         overrides: list[str] = ()) -> dict:
    """Run the benchmark with a preset (default | smoke | full) or explicit sizes, changed by `field=value`
    overrides; returns the results dict (also written to json_path when given)."""
    if preset not in PRESETS:
        raise CaptionerError(f"unknown bench preset '{preset}'; use one of {', '.join(PRESETS)}")
    require_min(("--threads", threads, 1))
    device = resolve_device(device)
    sizes = apply_overrides(dataclasses.replace(sizes or PRESETS[preset]), list(overrides))
    if compile is not None:
        sizes.compile = compile
    if preset == "full" and device.type != "cuda":
        log.warning("bench --full is sized for a GPU: on %s it will take a long time", device)
    on_cuda = device.type == "cuda"
    compute = setup_compute(ComputeConfig(sizes.bf16, sizes.channels_last, sizes.compile, sizes.gpu_decode), device)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous_threads)
        with tempfile.TemporaryDirectory(prefix="captioner-bench-") as workdir:
            numbers = run(sizes, compute, Path(workdir))
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    results = {
        "device": _device_name(device, threads),
        "versions": {"captioner": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda if on_cuda else None,
                     "cudnn": torch.backends.cudnn.version() if on_cuda else None},
        "settings": {"preset": preset, "device_type": device.type, "threads": threads,
                     **dataclasses.asdict(sizes),
                     # what actually ran, after resolving auto for this device
                     "bf16_active": compute.bf16, "compile_active": compute.compile,
                     "channels_last_active": compute.channels_last, "gpu_decode_active": compute.gpu_decode,
                     "compute": compute.describe()},
        **({"cpu_capability": dataclasses.asdict(cpu_capability()) | {"native_bf16": cpu_capability().native_bf16}}
           if not on_cuda else {}),
        **{k: round(v, 4 if k.endswith("fraction") else 2) for k, v in numbers.items()},
        "beam_batched_speedup": round(numbers["beam_batched_images_per_s"] / numbers["beam_per_image_images_per_s"], 2),
        "train_cached_speedup": round(numbers["train_captions_per_s_cached"] / numbers["train_captions_per_s_images"],
                                      2),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if json_path:
        write_json(json_path, results, "bench results", indent=1)
    return results


def format_table(results: dict) -> str:
    s = results["settings"]
    lines = [f"captioner bench on {results['device']} ({s['preset']}: {s['arch']} {s['layer']} at {s['image_size']}, "
             f"{s['jpeg_width']}x{s['jpeg_height']} JPEGs, decoder {s['decoder_dim']}, vocabulary {s['vocab_size']}, "
             f"bf16 {'on' if s['bf16_active'] else 'off'}, channels_last "
             f"{'on' if s['channels_last_active'] else 'off'}, compile {'on' if s['compile_active'] else 'off'})"]
    if "cpu_capability" in results:
        cap = results["cpu_capability"]
        lines.append(f"  CPU: {cap['isa']} kernels, AVX512-BF16 {'yes' if cap['avx512_bf16'] else 'no'}, "
                     f"AMX {'yes' if cap['amx'] else 'no'}")
    units = {"images": "images/s", "captions": "captions/s"}
    for key in (*KEYS, "beam_batched_speedup", "train_cached_speedup"):
        unit = "x" if key.endswith("speedup") else units["captions" if "captions" in key else "images"]
        lines.append(f"  {key:<32} {results[key]:>12,.2f} {unit}")
    lines.append(f"  {'scst_reward_fraction':<32} {results['scst_reward_fraction']:>12.4f} of the SCST step time")
    lines.append(f"  ({results['seconds']} s in all)")
    return "\n".join(lines)
