"""The Python API: `Captioner`, over the same Predictor and image pipeline as `captioner caption` and `serve`.

    from captioner import Captioner
    cap = Captioner.from_pretrained("runs/tiny/best.pt")       # or "model/" (captioner export), or "owner/model"
    cap.caption("photo.jpg")                                    # -> Caption(text=..., score=..., words=[...])
    cap.caption([Image.open("a.png"), frame_uint8, tensor_chw])  # -> [Caption, ...] in input order
    for c in cap.stream(paths_from_a_generator): ...            # millions of inputs, a batch at a time
    cap.caption("photo.jpg", attention=True).attention          # (len(words), grid_h, grid_w)
    cap.caption("photo.jpg", beam_size=5, max_len=8, num_return_sequences=3).sequences   # [(text, score)] x 3
    cap.caption("photo.jpg", sample=True, top_p=0.9)            # per-call generation (engine/infer/generation.py)

A caption here equals the command's for the same image: the checkpoint is set up by Predictor.load (compute,
decode settings), images are decoded by data/images.py (EXIF orientation, alpha onto white, reduced-scale JPEG
decoding, the pixel limit) and batched by data/pipeline.py, and captions come from engine/infer/predict.py, as
for every command. See data/images.py for what "the same image" means for arrays of a large JPEG's pixels.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator, Union, cast

import numpy as np
import torch
from PIL import Image

from captioner.config import ComputeConfig
from captioner.data.images import MAX_PIXELS
from captioner.engine.infer.predict import Captioned
from captioner.engine.infer.predictor import Predictor
from captioner.errors import CaptionerError

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

    from captioner.engine.infer.generation import GenerationOptions
    from captioner.text import Vocabulary

# One image: a file path, a file's bytes or an open binary file, a PIL image, an HxW / HxWx3 / HxWx4 array (uint8,
# or float in [0, 1]), or a (3, H, W) tensor (uint8, or float in [0, 1]).
ImageInput = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray, torch.Tensor]
ERROR_MODES = ("raise", "keep")


@dataclass
class Caption:
    """One image's caption.

    text: the caption; score: its total log-probability under the model (higher is more confident); words: its
    words; attention: (len(words), grid_h, grid_w) float32 weights over the encoder's grid (attention=True);
    source: the path, or "images[i]" for an in-memory image; error: why the image could not be read
    (errors="keep" only; text is then ""); sequences: every caption generated for the image as (text, score),
    best first: [(text, score)], or num_return_sequences of them (the first is text, score)."""
    text: str
    score: float = 0.0
    words: list[str] = field(default_factory=list)
    attention: torch.Tensor | None = None
    source: str = ""
    error: str = ""
    sequences: list[tuple[str, float]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        if self.error:
            return f"Caption(error={self.error!r})"
        return f"Caption(text={self.text!r}, score={self.score:.3f})"


def _single(images) -> bool:
    """Whether images is one image rather than a collection of them."""
    if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)) or hasattr(images, "read"):
        return True
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim <= 3  # 4-D: a batch, one image per first index
    return False


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class Captioner:
    """A trained captioning model, ready to caption images from Python.

    Build it with `Captioner.from_pretrained(...)`; `caption()` takes one image or many and returns Caption
    objects, `stream()` yields them lazily for inputs too many to hold. Images are batched internally
    (batch_size), decoded in num_workers processes (0: in this process; paths benefit from workers)."""

    def __init__(self, predictor: Predictor, *, batch_size: int | None = None, num_workers: int = 0,
                 max_pixels: int = MAX_PIXELS):
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("max_pixels", max_pixels, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise CaptionerError(f"{name} must be an integer >= {low}, got {value!r}")
        self.predictor = predictor
        self.batch_size = batch_size or predictor.cfg.decode.batch_size
        self.num_workers, self.max_pixels = num_workers, max_pixels

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, device: str | torch.device | None = None, *,
                        beam_size: int | None = None, batch_size: int | None = None, num_workers: int = 0,
                        max_pixels: int = MAX_PIXELS, sample: bool = False, temperature: float | None = None,
                        compute: ComputeConfig | None = None, runtime: str = "torch",
                        revision: str | None = None) -> "Captioner":
        """Load a model the way every captioner command does (engine/infer/predictor.py Predictor.load).

        Args:
            model: a checkpoint written by `captioner train` ("runs/x/best.pt"), a model folder written by
                `captioner export` ("model/"), or a Hugging Face Hub repo id ("owner/name", the [hub] extra;
                revision picks a branch, tag or commit).
            device: "cpu", "cuda", "cuda:1", a torch.device, or None / "auto" (CUDA when available).
            beam_size: 1 is greedy; None: the model's own decode.beam_size.
            batch_size: images per batch (None: the model's decode.batch_size).
            num_workers: image decoding processes (0: decode in this process).
            max_pixels: larger images are refused as likely decompression bombs.
            sample, temperature: draw each word from the model's distribution (seed with torch.manual_seed).
            compute: this machine's precision and memory-format switches (default: auto).
            runtime: what runs the model: "torch" (PyTorch) or "onnxruntime" (a folder of `captioner export
                --format onnx`, the [onnx] extra).
        """
        if beam_size is not None and (not isinstance(beam_size, int) or beam_size < 1):
            raise CaptionerError(f"beam_size must be an integer >= 1, got {beam_size!r}")
        if temperature is not None and not temperature > 0:
            raise CaptionerError(f"temperature must be > 0, got {temperature!r}")
        predictor = Predictor.load(model, device, beam_size=beam_size, compute=compute, sample=sample,
                                   temperature=temperature, runtime=runtime, revision=revision)
        return cls(predictor, batch_size=batch_size, num_workers=num_workers, max_pixels=max_pixels)

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return self.predictor.device

    @property
    def image_size(self) -> int:
        """The side the model's input images are resized to."""
        return self.predictor.image_size

    @property
    def vocab(self) -> "Vocabulary":
        """The model's vocabulary (the words it can write)."""
        return self.predictor.vocab

    def __repr__(self) -> str:
        return f"Captioner({Path(self.predictor.source).name!r}: {self.predictor.description()}, on {self.device})"

    def caption(self, images: ImageInput | Iterable[ImageInput], *, attention: bool = False,
                errors: str = "raise", **generation: Unpack[GenerationOptions]) -> Caption | list[Caption]:
        """Caption one image (-> a Caption) or a list, tuple, iterable or 4-D batch of them (-> a list, in order).

        Args:
            images: paths, files' bytes or open binary files (decoded as `serve` decodes uploads), PIL images,
                numpy arrays (HxW, HxWx3 or HxWx4; uint8 or float in [0, 1]; a 4-D array
                is a batch of HxWxC images), torch tensors ((3, H, W), uint8 or float in [0, 1]; a 4-D tensor is
                a (B, 3, H, W) batch), mixed freely.
            attention: also return each word's attention map, Caption.attention (len(words), grid_h, grid_w).
            errors: "raise" (a CaptionerError naming the first image that cannot be read) or "keep" (its
                Caption has .error set and empty text; the others are captioned).
            **generation: how captions are chosen for this call, the decode.* settings by name (the model's
                own where not given), checked as the config checks them: beam_size (1: greedy), max_len (words),
                length_penalty, block_ngram, suppress_unk, sample, temperature, top_k (0: off), top_p (1.0: off),
                num_return_sequences (n best beams, n <= beam_size, or n samples: Caption.sequences, best
                first), groups, diversity; transformers' num_beams, max_new_tokens and do_sample are accepted
                for beam_size, max_len and sample. Sampling draws from torch's generator: torch.manual_seed(s)
                first gives the same captions again.
        """
        captions = self.stream(images, attention=attention, errors=errors, **generation)
        return next(captions) if _single(images) else list(captions)

    __call__ = caption

    def stream(self, images: ImageInput | Iterable[ImageInput], *, attention: bool = False,
               errors: str = "raise", **generation: Unpack[GenerationOptions]) -> Iterator[Caption]:
        """Yield one Caption per image, in order, reading images only a few batches ahead of the model (so a
        generator of millions of paths or frames never sits in memory). Arguments as caption()."""
        if errors not in ERROR_MODES:
            raise CaptionerError(f"errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
        settings = self.predictor.settings_for(generation)  # self.predictor.settings when none are given
        if _single(images):
            images = [cast(ImageInput, images)]
        # Enough items per chunk to keep every worker busy, few enough to hold in-memory inputs cheaply.
        chunk_size = self.batch_size * max(1, self.num_workers) * 2
        for start, items in zip(itertools.count(0, chunk_size), _chunks(cast(Iterable, images), chunk_size)):
            names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"images[{start + j}]"
                     for j, x in enumerate(items)]
            batches = self.predictor.image_batches(items, self.batch_size, min(self.num_workers, len(items)),
                                                   self.max_pixels, names)
            for _, captioned in self.predictor.caption_batches(batches, attention, settings):
                for c in captioned:
                    if c.error and errors == "raise":
                        raise CaptionerError(c.error)
                    yield self._caption(c, names[c.index])

    def _caption(self, c: Captioned, source: str) -> Caption:
        attention = None
        if c.alphas is not None:
            grid_h, grid_w = self.predictor.encoder.grid
            attention = c.alphas.reshape(len(c.words), grid_h, grid_w)  # (L, N) -> (L, grid_h, grid_w)
        return Caption(c.caption, c.score, c.words, attention, source, c.error, c.sequences)
