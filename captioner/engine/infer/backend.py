"""What computes the captions: a backend encodes images and takes decoding steps (model/steps.py).

    backend = TorchBackend(model)                      # the PyTorch modules, hooked encoder included
    backend = OnnxBackend.load("model/")               # ONNX Runtime sessions (onnx_runtime.py)
    with backend.running(device, bf16):
        raw = backend.encode(images)                   # (B, 3, S, S) uint8 -> (B, C, H, W)
        out = decode(backend.steps, raw, settings.search_options)  # the one set of decoding loops, either backend

Both describe their encoder the same way (backend.encoder: arch, layer, image_size, channels, grid), so the
commands above them (caption, evaluate, serve, bench) never ask which one runs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch

from captioner.engine.runtime.compute import autocast
from captioner.model.steps import DecoderSteps, TorchSteps


class Backend(Protocol):
    name: str  # "torch" | "onnxruntime"
    encoder: object  # arch, layer, image_size, in_channels, channels, grid (a HookedEncoder or an EncoderSpec)
    steps: DecoderSteps

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) uint8 images -> (B, C, H, W) float encoder activations."""

    def running(self, device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
        """The context captions are computed in (inference mode, the precision asked for where it applies)."""


class TorchBackend:
    """A CaptionModel's own modules: the hooked encoder, the projector and the decoder."""
    name = "torch"

    def __init__(self, model):
        self.model = model
        self.encoder = model.encoder
        self.steps = TorchSteps(model)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)

    @contextlib.contextmanager
    def running(self, device: torch.device, bf16: bool) -> Iterator[None]:
        """Eval mode and bf16 autocast where compute.bf16 resolved on; the caller's mode given back after."""
        with self.steps.evaluating(), autocast(device, bf16):
            yield


def as_backend(model_or_backend) -> Backend:
    """A CaptionModel wrapped in TorchBackend; a backend as it is."""
    if hasattr(model_or_backend, "steps") and hasattr(model_or_backend, "running"):
        return model_or_backend
    return TorchBackend(model_or_backend)
