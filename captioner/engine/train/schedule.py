"""Learning-rate schedules: linear warmup, then none | cosine | step | plateau, for every parameter group.

    schedule = LRSchedule(optimizer, "cosine", total_steps=10_000, steps_per_epoch=1_000, warmup_steps=500)
    schedule.step(step)        # before optimizer step `step` (1-based): sets each group's lr
    schedule.observe(score)    # after each validation; only plateau reacts

The lr is a pure function of the step (and, for plateau, of the scores seen), so state_dict() is three
numbers and a resumed run continues the same curve. Each group keeps its own base lr (decoder and encoder).
"""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, optimizer, kind: str = "none", total_steps: int = 1, steps_per_epoch: int = 1,
                 warmup_steps: int = 0, min_lr_ratio: float = 0.0, decay_epochs: int = 1, gamma: float = 0.1,
                 patience: int = 2):
        self.optimizer, self.kind = optimizer, kind
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.total_steps, self.steps_per_epoch = max(total_steps, 1), max(steps_per_epoch, 1)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.decay_epochs, self.gamma, self.patience = decay_epochs, gamma, patience
        # plateau state: the only part of the schedule that is not a function of the step
        self.plateau_scale, self.best, self.evals_without_gain = 1.0, -math.inf, 0

    def factor(self, step: int) -> float:
        """Multiplier of the base lrs at optimizer step `step` (1-based)."""
        warmup = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "cosine":
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))
            decay = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "step":
            decay = self.gamma ** ((step - 1) // (self.steps_per_epoch * self.decay_epochs))
        else:
            decay = 1.0
        return warmup * decay * self.plateau_scale

    def step(self, step: int) -> float:
        """Set every group's lr for this step; returns the first group's."""
        factor = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def observe(self, score: float) -> None:
        if self.kind != "plateau":
            return
        if score > self.best:
            self.best, self.evals_without_gain = score, 0
            return
        self.evals_without_gain += 1
        if self.evals_without_gain > self.patience:
            self.plateau_scale *= self.gamma
            self.evals_without_gain = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "evals_without_gain": self.evals_without_gain}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.best = float(state["plateau_scale"]), float(state["best"])
        self.evals_without_gain = int(state["evals_without_gain"])
