"""Exponential moving average of the trained weights (train.ema_decay): validation, best.pt and every
checkpoint's "model" hold the average; training steps the raw weights.

    average = WeightAverage(model, 0.99)
    average.update(model)                          # after each optimizer step
    with average.applied(model): validate(...)      # the averaged weights in place, the raw ones back after
    state = average.checkpoint_fields(model)         # {"model": averaged, "raw_weights": ..., "weight_average": ...}
    average.resume(model, checkpoint)                # a resumed run: the raw weights back into the model

Why: a short run's weights move a lot from step to step, and best.pt is whichever epoch's noisy weights happened
to score on a few val photos; the average of the last steps is a smoother model (Polyak averaging; timm's ModelEma,
TensorFlow's ExponentialMovingAverage). Its decay warms up as TensorFlow's num_updates does, min(decay,
(1 + n) / (10 + n)), so a run of a few hundred steps averages its recent steps, not its random start.
Only the trainable parameters are averaged (the frozen encoder does not move): cheap, and the buffers are the
model's own.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from captioner.errors import CaptionerError


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0  # optimizer steps averaged so far: the warm-up of the decay
        self.shadow = {name: p.detach().clone() for name, p in _trainable(model).items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, over every trainable tensor in one fused call."""
        params = _trainable(model)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach() for n in names],
                             1.0 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The averaged weights in the model for the block (validation, sample captions); the raw ones after,
        also when the block raises (a stop signal during validation)."""
        params = _trainable(model)
        with torch.no_grad():
            raw = {name: params[name].detach().clone() for name in self.shadow}
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    params[name].copy_(value)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """model.state_dict() with the averaged weights: what a checkpoint's "model" holds and every loader reads."""
        return {**model.state_dict(), **{name: value.detach() for name, value in self.shadow.items()}}

    def checkpoint_fields(self, model: nn.Module) -> dict:
        return {"model": self.averaged_state_dict(model),
                "raw_weights": {name: p.detach() for name, p in _trainable(model).items()},
                "weight_average": {"decay": self.decay, "updates": self.updates}}

    @torch.no_grad()
    def resume(self, model: nn.Module, checkpoint: dict, path) -> None:
        """Called right after construction on a model holding the checkpoint's "model" (the average, which the
        constructor took as the shadow): its "raw_weights" go back into the model to train on. A checkpoint
        written without averaging starts the average from its weights."""
        raw, recorded = checkpoint.get("raw_weights"), checkpoint.get("weight_average")
        if raw is None or not isinstance(recorded, dict):
            return
        params = _trainable(model)
        if not isinstance(raw, dict) or set(raw) != set(params) or not isinstance(recorded.get("updates"), int):
            raise CaptionerError(f"checkpoint {path}: its raw_weights do not fit the model's trainable tensors "
                                 f"(edited by hand, or another encoder.finetune_from?); start a new --run-dir")
        for name, p in params.items():
            if raw[name].shape != p.shape:
                raise CaptionerError(f"checkpoint {path}: raw_weights[{name!r}] has shape {tuple(raw[name].shape)}, "
                                     f"the model {tuple(p.shape)}")
            p.copy_(raw[name])
        self.updates = recorded["updates"]
