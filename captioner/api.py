"""The Python API: `Captioner`, over the same Predictor and image pipeline as `captioner caption` and `serve`.

    from captioner import Captioner
    cap = Captioner.from_pretrained("runs/tiny/best.pt")       # or "model/" (captioner export), or "owner/model"
    cap.caption("photo.jpg")                                    # -> Caption(text=..., score=..., words=[...])
    cap.caption([Image.open("a.png"), frame_uint8, tensor_chw])  # -> [Caption, ...] in input order
    for c in cap.stream(paths_from_a_generator): ...            # millions of inputs, a batch at a time
    cap.caption("photo.jpg", attention=True).attention          # (len(words), grid_h, grid_w)
    cap.caption("photo.jpg", beam_size=5, max_len=8, num_return_sequences=3).sequences   # [(text, score)] x 3
    cap.caption("photo.jpg", sample=True, top_p=0.9)            # per-call generation (engine/infer/generation.py)
    # the model itself (api_model.py): dtype=/.to(), .model, .transform, save_pretrained, push_to_hub

A caption here equals the command's for the same image: the checkpoint is set up by Predictor.load (compute,
decode settings), images are decoded by data/images.py (EXIF orientation, alpha onto white, reduced-scale JPEG
decoding, the pixel limit) and batched by data/pipeline.py, and captions come from engine/infer/predict.py, as
for every command. See data/images.py for what "the same image" means for arrays of a large JPEG's pixels.
"""
from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Union, cast, overload

import numpy as np
import torch
from PIL import Image

from captioner.api_model import ModelHandling, compute_for_dtype
from captioner.arguments import (check_arguments, check_choice, check_compute, check_count, check_device, check_flag,
                                 check_model_name, check_optional_text)
from captioner.config import ComputeConfig
from captioner.data.images import MAX_PIXELS
from captioner.engine.infer.predict import Captioned
from captioner.engine.infer.predictor import RUNTIMES, Predictor
from captioner.errors import CaptionerError, ErrorText

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

    from captioner.engine.infer.generation import GenerationOptions
    from captioner.text import Vocabulary

# One image: a file path, a file's bytes or an open binary file, a PIL image, an HxW / HxWx3 / HxWx4 array or a
# (3, H, W) tensor; which dtypes and values are pixels: data/pixels.py (uint8 0-255, 16-bit, float in [0, 1]).
# Bad input of any kind is a CaptionerError (a ValueError) naming the argument or the item (errors.py).
ImageInput = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray, torch.Tensor]
OneImage = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]  # always one image (arrays: one or a batch)
ERROR_MODES = ("raise", "keep")

# A lock that another thread holds when the process forks (a DataLoader worker started while a thread captions)
# stays held forever in the child, whose first caption() would then hang: the child gets fresh locks.
_live_captioners: "weakref.WeakSet[Captioner]" = weakref.WeakSet()


def _fresh_locks_after_fork() -> None:
    for captioner in list(_live_captioners):
        captioner._lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which never forks
    os.register_at_fork(after_in_child=_fresh_locks_after_fork)


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
    """Whether images is one image rather than a collection of them. Anything that is not a collection (None,
    a number, a mapping) is one item, which is then refused with its index like any bad image."""
    if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)) or hasattr(images, "read"):
        return True
    if isinstance(images, torch.Tensor):  # 4-D: a batch, one image per first index (sparse: refused as one)
        return images.ndim != 4 or images.layout != torch.strided
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return not isinstance(images, Iterable) or isinstance(images, Mapping)


def _name(item, index: int) -> str:
    """How errors and Caption.source call an item: a path by itself, anything else images[index]."""
    if isinstance(item, (str, os.PathLike)):
        try:
            name = os.fspath(item)
            return name if isinstance(name, str) else f"images[{index}]"
        except TypeError:  # a PathLike whose __fspath__ gives no path: read_any refuses it with this name
            pass
    return f"images[{index}]"


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class Captioner(ModelHandling):
    """A trained captioning model, ready to caption images from Python.

    Build it with `Captioner.from_pretrained(...)`; `caption()` takes one image or many and returns Caption
    objects, `stream()` yields them lazily for inputs too many to hold. Images are batched internally
    (batch_size), decoded in num_workers processes (0: in this process; paths benefit from workers).
    The model itself: dtype= and .to(), .model (the nn.Module), .transform (its preprocessing),
    save_pretrained(), push_to_hub() (api_model.py).

    Thread safety: threads may share one Captioner. Batches go through the model one at a time (a lock: the
    hooked encoder holds its captured activation on itself), so every thread gets the captions a serial run
    gives; threads overlap only outside the model (decoding images in num_workers processes, their own work).
    For parallel model throughput, batch (caption a list), or run `captioner serve`, which batches across requests."""

    def __init__(self, predictor: Predictor, *, batch_size: int | None = None, num_workers: int = 0,
                 max_pixels: int = MAX_PIXELS):
        if not isinstance(predictor, Predictor):
            raise CaptionerError(f"Captioner takes a loaded Predictor, got {type(predictor).__name__}: build one "
                                 f"with Captioner.from_pretrained(path)")
        # decode.batch_size's and compute.num_workers's rules, as in a config file (arguments.py)
        checked = check_arguments(batch_size=batch_size, num_workers=num_workers)
        self.predictor = predictor
        self.batch_size = checked["batch_size"] or predictor.cfg.decode.batch_size
        self.num_workers, self.max_pixels = checked["num_workers"], check_count("max_pixels", max_pixels, 1)
        self._lock = threading.Lock()  # one batch at a time through the model (thread safety, above)
        _live_captioners.add(self)  # a forked child gets a fresh lock (_fresh_locks_after_fork)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, device: str | torch.device | None = None, *,
                        beam_size: int | None = None, batch_size: int | None = None, num_workers: int = 0,
                        max_pixels: int = MAX_PIXELS, sample: bool = False, temperature: float | None = None,
                        compute: ComputeConfig | None = None, runtime: str = "torch",
                        revision: str | None = None, dtype: str | torch.dtype | None = None,
                        torch_dtype: str | torch.dtype | None = None, providers: list[str] | None = None,
                        session_options: dict | None = None) -> "Captioner":
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
            compute: this machine's precision and memory-format switches (default: auto): a ComputeConfig or a
                dict of compute keys ({"bf16": "false"}), checked as a config file's compute: section.
            runtime: what runs the model: "torch" (PyTorch) or "onnxruntime" (a folder of `captioner export
                --format onnx`, the [onnx] extra).
            dtype (or torch_dtype, transformers' name): torch.bfloat16 / "bf16" runs in bf16 autocast,
                torch.float32 / "float32" in float32; None: compute's choice (auto: bf16 on CUDA and bf16 CPUs).
                The PyTorch runtime only: ONNX Runtime runs its graphs as exported (dtype float32; bf16 refused).
            providers: with runtime="onnxruntime", its execution providers in order, e.g.
                ["CUDAExecutionProvider", "CPUExecutionProvider"] (default: from device).
            session_options: with runtime="onnxruntime", {"intra_op_threads": 1, "graph_optimization": "all"}
                (graph_optimization: disable, basic, extended or all).

        Every argument follows the rules of the config key it stands for (beam_size: decode.beam_size, ...);
        a bad one, a missing or broken model: CaptionerError (a ValueError) naming it.
        """
        # Every argument before any file is read, by its config key's rules (arguments.py): one line naming it.
        check_model_name(model)
        checked = check_arguments(beam_size=beam_size, batch_size=batch_size, num_workers=num_workers,
                                  sample=sample, temperature=temperature)
        max_pixels = check_count("max_pixels", max_pixels, 1)
        if not isinstance(runtime, str):  # a str is named by Predictor.load, with the runtimes there are
            check_choice("runtime", runtime, RUNTIMES)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise CaptionerError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: give one")
        compute = compute_for_dtype(dtype if dtype is not None else torch_dtype, check_compute(compute))
        predictor = Predictor.load(model, check_device(device), beam_size=checked["beam_size"],
                                   compute=compute, sample=checked["sample"],
                                   temperature=checked["temperature"], runtime=runtime,
                                   revision=check_optional_text("revision", revision),
                                   providers=providers, session_options=session_options)
        return cls(predictor, batch_size=checked["batch_size"], num_workers=checked["num_workers"],
                   max_pixels=max_pixels)

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

    # A str (and an array) is also an Iterable: the first overload that matches wins, as in typeshed.
    @overload
    def caption(self, images: OneImage, *, attention: bool = False,  # type: ignore[overload-overlap]
                errors: str = "raise", **generation: Unpack[GenerationOptions]) -> Caption: ...

    @overload  # an array or a tensor is one image (HxW[xC], (3, H, W)) or a 4-D batch of them
    def caption(self, images: np.ndarray | torch.Tensor, *, attention: bool = False,  # type: ignore[overload-overlap]
                errors: str = "raise", **generation: Unpack[GenerationOptions]) -> Caption | list[Caption]: ...

    @overload
    def caption(self, images: Iterable[ImageInput], *, attention: bool = False,
                errors: str = "raise", **generation: Unpack[GenerationOptions]) -> list[Caption]: ...

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

        Anything that is not an image (None, a number, a closed file, a meta or sparse tensor, NaN pixels) is
        such an image that cannot be read: CaptionerError "images[3]: ..." (a path names itself), or with
        errors="keep" its Caption's .error. Never another exception type for bad input.
        """
        captions = self.stream(images, attention=attention, errors=errors, **generation)
        return next(captions) if _single(images) else list(captions)

    __call__ = caption

    def stream(self, images: ImageInput | Iterable[ImageInput], *, attention: bool = False,
               errors: str = "raise", **generation: Unpack[GenerationOptions]) -> Iterator[Caption]:
        """Yield one Caption per image, in order, reading images only a few batches ahead of the model (so a
        generator of millions of paths or frames never sits in memory). Arguments as caption()."""
        check_choice("errors", errors, ERROR_MODES)
        attention = check_flag("attention", attention)
        settings = self.predictor.settings_for(generation)  # self.predictor.settings when none are given
        if _single(images):
            images = [cast(ImageInput, images)]
        # Enough items per chunk to keep every worker busy, few enough to hold in-memory inputs cheaply.
        chunk_size = self.batch_size * max(1, self.num_workers) * 2
        for start, items in zip(itertools.count(0, chunk_size), _chunks(cast(Iterable, images), chunk_size)):
            names = [_name(x, start + j) for j, x in enumerate(items)]
            batches = self.predictor.image_batches(items, self.batch_size, min(self.num_workers, len(items)),
                                                   self.max_pixels, names)
            for _, captioned in self._one_at_a_time(self.predictor.caption_batches(batches, attention, settings)):
                for c in captioned:
                    if c.error and errors == "raise":
                        raise ErrorText.raised(c.error)  # a file problem stays an OSError too
                    yield self._caption(c, names[c.index])

    def _caption(self, c: Captioned, source: str) -> Caption:
        attention = None
        if c.alphas is not None:
            grid_h, grid_w = self.predictor.encoder.grid
            attention = c.alphas.reshape(len(c.words), grid_h, grid_w)  # (L, N) -> (L, grid_h, grid_w)
        return Caption(c.caption, c.score, c.words, attention, source, c.error, c.sequences)
