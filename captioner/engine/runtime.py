"""Small helpers every job shares: device choice, seeding, and the random generators' states for checkpoints."""
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


def rng_state() -> dict:
    """Python, NumPy and torch (CPU, current CUDA device) generator states as plain lists and tensors,
    so a checkpoint holding them still loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            # Only the current device: get_rng_state_all() would open a context on every GPU of every rank.
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
