"""A checkpoint ready to caption: the model on a device, in eval mode, with this machine's compute and the
decode settings. `caption`, `evaluate`, `serve` and `bench` set a model up through it, so none of them can
drift from the others (transformers' pipeline and CLIP's `load` return the model with its preprocessing the same way).

    predictor = Predictor.load("runs/tiny/best.pt", device="auto", beam_size=3)
    captioned = predictor.caption_batch(images)                 # (B, 3, S, S) uint8 on predictor.device
    batches = predictor.image_batches(paths, batch_size=32, num_workers=2)
    for batch, captioned in predictor.caption_batches(batches, attention=True): ...

The decoding itself is engine/infer/predict.py's (the one decode path); this class only holds what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.config import ComputeConfig, Config, apply_overrides
from captioner.data.images import MAX_PIXELS
from captioner.data.pipeline import Batches, image_batches
from captioner.engine.infer.checkpoint import load_model
from captioner.engine.infer.predict import Captioned, DecodeSettings, caption_batch, caption_batches
from captioner.engine.runtime.compute import Compute, setup_compute
from captioner.engine.runtime.device import resolve_device
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary


@dataclass
class Predictor:
    model: CaptionModel  # in eval mode, on device, encoder prepared (channels_last / compile) as compute says
    vocab: Vocabulary
    cfg: Config  # the checkpoint's config, with this machine's compute and the caller's overrides
    compute: Compute  # the resolved precision and memory format
    settings: DecodeSettings
    source: str  # the checkpoint it came from

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device | None = "auto", *,
             beam_size: int | None = None, compute: ComputeConfig | None = None, overrides=(),
             sample: bool = False, temperature: float | None = None) -> "Predictor":
        """Load checkpoint onto device ('auto': CUDA when present) and resolve how it decodes.

        compute: this machine's switches (default: the checkpoint's compute section, which loading resets to auto,
        since it described the training machine); overrides: `section.key=value` applied to the checkpoint's
        config before anything is resolved (evaluate passes dataset.*, decode.*, compute.*, cache.*);
        beam_size, sample, temperature: override decode.beam_size / decode.sample / decode.temperature."""
        device = device if isinstance(device, torch.device) else resolve_device(device)
        model, vocab, cfg = load_model(checkpoint, device)
        cfg.compute = compute or cfg.compute
        apply_overrides(cfg, list(overrides))
        cfg.decode.sample = sample or cfg.decode.sample
        if temperature is not None:
            cfg.decode.temperature = temperature
        resolved = setup_compute(cfg.compute, device)
        resolved.prepare_encoder(model.encoder)
        return cls(model, vocab, cfg, resolved, DecodeSettings.of(cfg, beam_size, compute=resolved), str(checkpoint))

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @property
    def image_size(self) -> int:
        return self.model.encoder.image_size

    def caption_batch(self, inputs: torch.Tensor, attention: bool = False) -> list[Captioned]:
        """(B, 3, S, S) uint8 images or (B, C, H, W) features on self.device -> B Captioned, in order."""
        return caption_batch(self.model, self.vocab, inputs, self.settings, attention)

    def caption_batches(self, batches, attention: bool = False):
        """For each pipeline Batch -> (batch, [Captioned]); only readable rows are decoded (predict.py)."""
        return caption_batches(self.model, self.vocab, batches, self.settings, attention)

    def image_batches(self, paths: list[str], batch_size: int | None = None, num_workers: int = 0,
                      max_pixels: int = MAX_PIXELS) -> Batches:
        """The pipeline's batches of these files at the model's input size and resize filter, decoded as compute
        says."""
        return image_batches(paths, self.image_size, batch_size or self.cfg.decode.batch_size, num_workers,
                             self.device, self.compute.gpu_decode, max_pixels, self.model.encoder.interpolation)

    def decoding(self) -> str:
        """How captions are chosen, in words: 'greedy decoding', 'beam search (beam 3)' or 'sampling (...)'."""
        s = self.settings
        if s.sample:
            return f"sampling (temperature {s.temperature:g})"
        return "greedy decoding" if s.beam_size == 1 else f"beam search (beam {s.beam_size})"

    def description(self) -> str:
        """One line on what decodes and what it attends over, for titles and /v1/model."""
        enc = self.model.encoder
        return (f"{self.decoding()}, attention over the {enc.grid[0]}x{enc.grid[1]} {enc.layer} grid of "
                f"{enc.arch}")
