"""The device a command runs on: 'auto' resolves to CUDA when present; a device the machine lacks is one line."""
from __future__ import annotations

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
