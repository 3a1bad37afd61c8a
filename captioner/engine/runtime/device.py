"""The device a command runs on: 'auto' resolves to CUDA when present; a device the machine lacks is one line
naming the ones it has."""
from __future__ import annotations

import torch

from captioner.errors import CaptionerError


def available_devices() -> list[str]:
    """The devices this machine can run on: cpu, then cuda:0..N-1, mps and xpu where present."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def _refuse(name: str, why: str) -> CaptionerError:
    return CaptionerError(f"--device {name}: {why}; this machine has: {', '.join(available_devices())} "
                          f"(or auto: CUDA when present, else cpu)")


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; any other name must be a device this machine has
    (cpu, cuda, cuda:N with N < the GPUs visible, mps, xpu), else one line lists the ones it has."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip().lower())
    except (RuntimeError, ValueError, TypeError):
        raise _refuse(name, "not a device name") from None
    available = available_devices()
    if device.type == "cpu" and device.index in (None, 0):
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise _refuse(name, "CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise _refuse(name, f"only {count} GPU{'s' if count > 1 else ''} visible")
        return device
    if device.type == "mps" and "mps" in available and device.index in (None, 0):
        return device
    if device.type == "xpu" and any(n.startswith("xpu") for n in available):
        if device.index is None or f"xpu:{device.index}" in available:
            return device
    raise _refuse(name, f"no {device.type} device here" if device.type != "cpu" else "cpu takes no index")
