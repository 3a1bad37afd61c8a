"""Small helpers every job shares: device choice and seeding."""
from __future__ import annotations

import random

import numpy as np
import torch

from captioner.errors import CaptionerError


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; an explicit cuda without CUDA is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionerError(f"--device {name} asked for, but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CaptionerError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for the DataLoader's shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
