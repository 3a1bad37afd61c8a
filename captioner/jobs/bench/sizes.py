"""What `captioner bench` measures and at which sizes: the result keys, the sizes of one run, the presets."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass

from captioner.config import Switch, coerce
from captioner.config.load import override_value
from captioner.config.validate import INT_RANGE
from captioner.errors import CaptionerError

KEYS = ("encoder_images_per_s", "extract_images_per_s", "train_captions_per_s_cached",
        "train_captions_per_s_images", "caption_images_per_s_greedy", "caption_images_per_s_beam3",
        "beam_per_image_images_per_s", "beam_batched_images_per_s", "train_scst_images_per_s")


@dataclass
class BenchSizes:
    arch: str = "resnet18"
    layer: str = ""  # as encoder.layer: "" is the arch's last feature stage (layer4 of a ResNet, features of MobileNetV2)
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
    # --runtimes: PyTorch float32 against ONNX Runtime float32 and int8 (runtimes.py)
    runtime_archs: str = "resnet152,resnet18"  # comma-separated: each exported and compared side by side
    runtime_images: int = 32  # JPEG files captioned per runtime and round
    runtime_batch: int = 16
    runtime_rounds: int = 3  # the runtimes take turns in each round; speedups are medians over rounds
    calibration_images: int = 16  # int8: encoder activation ranges from this many of the JPEGs


PRESETS = {
    "default": BenchSizes(),
    "smoke": BenchSizes(image_size=64, jpeg_width=96, jpeg_height=72, embed_dim=32, attention_dim=32,
                        decoder_dim=32, vocab_size=60, caption_words=6, captions_per_image=2, max_len=6,
                        encoder_batch=4, encoder_images=8, extract_images=8, train_batch=4, train_steps_cached=2,
                        train_steps_images=1, caption_images=4, caption_batch=4, beam_images=4, num_workers=0,
                        scst_images=4, scst_samples=2, scst_steps=1, runtime_archs="resnet18", runtime_images=4,
                        runtime_batch=4, runtime_rounds=1, calibration_images=4),
    "full": BenchSizes(arch="resnet152", encoder_batch=256, encoder_images=4096, extract_images=4096,
                       train_batch=256, train_steps_cached=200, train_steps_images=8, caption_images=8192,
                       caption_batch=256, num_workers=min(16, os.cpu_count() or 1), compile=True, gpu_decode=True),
}


def apply_overrides(sizes: BenchSizes, overrides: list[str]) -> BenchSizes:
    """`field=value` strings (arch=resnet152 train_batch=64) on top of sizes; unknown fields are errors."""
    types = typing.get_type_hints(BenchSizes)
    specs = {f.name: f for f in dataclasses.fields(BenchSizes)}
    given = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise CaptionerError(f"bench override '{item}' is not field=value with a field among: {', '.join(types)}")
        if key in given and given[key] != item:  # the last would win silently
            raise CaptionerError(f"bench override {key} is given twice ({given[key]} and {item}): give it once")
        given[key] = item
        # The config's own coercion: whole numbers in range, text as typed, switches; never a silent conversion.
        value = override_value(raw, types[key])
        spec = specs[key]
        if types[key] is int and key != "num_workers":  # sizes and counts start at 1, as the check below says
            spec = dataclasses.field(metadata={"range": (1, INT_RANGE[1])})
        setattr(sizes, key, coerce(key, value, types[key], spec, label=f"bench override {key}"))
    positive = [f.name for f in dataclasses.fields(sizes) if types[f.name] is int and getattr(sizes, f.name) < 1
                and f.name != "num_workers"]
    if positive or sizes.num_workers < 0:
        raise CaptionerError(f"bench sizes must be >= 1 (num_workers >= 0): {', '.join(positive) or 'num_workers'}")
    if sizes.beam_images > sizes.extract_images:
        raise CaptionerError(f"bench beam_images ({sizes.beam_images}) must be <= extract_images "
                             f"({sizes.extract_images}): beam search reads the extracted features")
    return sizes
