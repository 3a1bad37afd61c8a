"""The one training step: forward, loss, backward, unscale, clip, optimizer step, zero_grad, NaN guard.

    step = TrainingStep(CaptionLoss(model), build_optimizer(model, cfg), cfg.train.grad_clip, device, bf16=True)
    result = step(images_or_features, captions, lengths)   # StepResult(loss, grad_norm or None, stop)

`train` and `bench` both call it. The loss is a module, so another objective goes through the same step:
any nn.Module whose forward(*inputs) returns (loss, part, count) fits, where loss is the scalar to minimise
and part, when not None, is the piece of loss that is a mean over `count` units that differ in number between
processes (CaptionLoss: the cross-entropy over a batch's tokens), so that under DDP it is weighted exactly.
A self-critical loss (sampled captions, rewards) returns (loss, None, None).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from captioner.config import Config
from captioner.engine.runtime import distributed
from captioner.engine.runtime.compute import autocast
from captioner.engine.runtime.distributed import Process
from captioner.model.caption_model import CaptionModel
from captioner.model.decoder import caption_loss

log = logging.getLogger("captioner")


class CaptionLoss(nn.Module):
    """Encoder (for image inputs), teacher-forced decoder and loss as one module, so that DDP sees the whole
    forward pass: the fine-tuned encoder stages too."""

    def __init__(self, model: CaptionModel, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, inputs, captions, lengths):
        """inputs (B, 3, S, S) uint8 images or (B, C, H, W) float features, captions (B, T+2), lengths (B,)
        -> (loss, cross-entropy, tokens it is a mean over)."""
        captions = captions[:, : int(lengths.max())]  # trim padding beyond the longest caption in the batch
        raw = inputs if inputs.is_floating_point() else self.model.encode(inputs)
        logits, alphas = self.model(raw, captions, lengths)  # bf16 under autocast; caption_loss works in float32
        loss, ce = caption_loss(logits, alphas, captions, lengths, self.model.alpha_c, self.label_smoothing)
        return loss, ce, (lengths - 1).sum()  # words + <end> of each caption


def build_optimizer(model: CaptionModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: projector and decoder at train.lr, fine-tuned encoder stages
    (encoder.finetune_from) at train.encoder_lr."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    in_encoder = {id(p) for p in encoder}
    head = [p for p in model.trainable_parameters() if id(p) not in in_encoder]
    groups = [{"params": head, "lr": cfg.train.lr, "name": "decoder"}]
    if encoder:
        groups.append({"params": encoder, "lr": cfg.train.encoder_lr, "name": "encoder"})
    for group in groups:
        log.info("optimizing %s: %d tensors, %.2fM parameters, lr %g", group["name"], len(group["params"]),
                 sum(p.numel() for p in group["params"]) / 1e6, group["lr"])
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def grad_scaler(device: torch.device, enabled: bool = False):
    """bf16 (compute.bf16) keeps float32's range and needs no loss scaling; float16 is not offered since
    random-weight activations (~1e8) overflow it. The disabled scaler keeps the one unscale/clip/step path."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


@dataclass
class StepResult:
    loss: float  # the global batch's loss (all processes), nan or inf when not finite
    grad_norm: float | None  # None: the loss or the gradient was not finite and the step was skipped
    stop: bool  # some process was asked to stop (a signal): every process learns it at the same step
    part: float | None = None  # the global batch's `part` (CaptionLoss: the cross-entropy alone, without the
    # attention penalty, which on a small grid adds several nats: loss then reads above ln(vocabulary size))


class TrainingStep:
    """One optimizer step of `loss_fn` (an nn.Module, maybe wrapped in DistributedDataParallel)."""

    def __init__(self, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 device: torch.device, bf16: bool = False, process: Process | None = None, scaler=None):
        self.loss_fn, self.optimizer, self.device, self.bf16 = loss_fn, optimizer, device, bf16
        self.clip = grad_clip if grad_clip > 0 else math.inf  # 0 disables clipping
        self.process = process or Process(0, 1, 0, device)
        self.scaler = scaler if scaler is not None else grad_scaler(device)

    def __call__(self, *inputs, stop: bool = False) -> StepResult:
        with autocast(self.device, self.bf16):
            loss, part, count = self.loss_fn(*inputs)
        loss, (global_loss, global_part), stop = self._reduce(loss, part, count, stop)
        grad_norm = self._backward_and_step(loss) if math.isfinite(global_loss) else None
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(global_loss, grad_norm, stop, global_part)

    def _reduce(self, loss, part, count, stop: bool) -> tuple[torch.Tensor, tuple[float, float | None], bool]:
        """(loss to backpropagate here, (the global batch's loss and part), whether any process was asked to stop).

        DDP averages the processes' gradients, but `part` is a mean over this process's own `count` units
        (tokens). Weighting it by its share of the global batch's units makes that average exactly the
        gradient of one process training on the whole global batch. One all_reduce per step carries it all."""
        process = self.process
        if not process.distributed:
            if part is None:
                return loss, (loss.item(), None), stop
            both = torch.stack([loss.detach(), part.detach()]).tolist()  # one host sync for the two
            return loss, (both[0], both[1]), stop
        has_part, part = part is not None, torch.zeros_like(loss) if part is None else part
        count = torch.ones((), device=loss.device) if count is None else count
        rest = loss - part  # a mean over the same number of items in every process (attention penalty, ...)
        flag = torch.tensor(float(stop), device=loss.device)
        count = count.to(part.dtype)
        totals = distributed.all_reduce_sum(torch.stack([part.detach() * count, count, rest.detach(), flag]), process)
        local = part * (count * process.world_size / totals[1]) + rest
        global_loss = (totals[0] / totals[1] + totals[2] / process.world_size).item()
        return local, (global_loss, (totals[0] / totals[1]).item() if has_part else None), bool(totals[3] > 0)

    def _backward_and_step(self, loss) -> float | None:
        """Backward, unscale, clip, step. Returns the gradient norm, or None when it was not finite (skipped)."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        if not math.isfinite(norm) and not self.scaler.is_enabled():  # an enabled scaler skips such steps itself
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return norm
