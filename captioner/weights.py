"""The one weight-file reader and the safetensors writer: state_dicts in and out of files, never running code.

    state = read_state_dict("backbone.safetensors", "encoder weights file")   # or .pt / .pth / .bin
    write_safetensors("model/model.safetensors", model.state_dict(), {"format_version": "1"})

`.safetensors` files are read with safetensors (no pickle at all: a model folder loads with torch.load never
called); anything else with `torch.load(..., weights_only=True)`, which refuses pickled code. Both the encoder's
`encoder.weights` and model folders read through `read_state_dict`, so the two can never disagree on what a
weights file is. It lives beside files.py (below model/ and engine/) because both layers read weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from captioner.errors import CaptionerError, first_line, os_failure
from captioner.files import atomic_write

SAFETENSORS_SUFFIX = ".safetensors"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", SAFETENSORS_SUFFIX)


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:  # an install_requires; only a broken environment lacks it
        raise CaptionerError('reading and writing .safetensors files needs safetensors: pip install safetensors') from None
    return safetensors.torch


def read_state_dict(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state_dict (names -> CPU tensors) from path; one line naming the file when it is missing or unreadable.

    A checkpoint-style dict that wraps the weights under "state_dict" or "model" is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CaptionerError(f"{what} {path} not found")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            state = _safetensors_torch().load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CaptionerError:
        raise
    except OSError as e:  # the machine (EIO, ...) or the path (permission): os_failure tells them apart
        raise os_failure(f"{what} {path}: cannot read", e) from None
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign files all get the same one-line answer
        reason = first_line(e)
        if reason.startswith("Weights only load failed"):  # torch's advice to turn weights_only off is not ours
            reason = "not a torch file of tensors (garbage, or pickled objects that are never loaded)"
        raise CaptionerError(f"{what} {path} is not a readable state_dict: {reason}") from None
    for key in ("state_dict", "model"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CaptionerError(f"{what} {path} does not hold a state_dict (names -> tensors)")
    return state


def read_safetensors_metadata(path: str | Path, what: str = "weights file") -> dict[str, str]:
    """The string metadata in a .safetensors header (read without loading any tensor)."""
    try:
        with _safetensors_torch().safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except CaptionerError:
        raise
    except Exception as e:  # noqa: BLE001
        reason = first_line(e)
        raise CaptionerError(f"{what} {path} is not a readable safetensors file: {reason}") from None


def write_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      what: str = "weights file") -> None:
    """state (names -> tensors) into a .safetensors file, atomically (files.atomic_write).

    Tensors that share storage (tied weights) are written as separate copies: safetensors stores no aliases."""
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    data = _sorted_header(_safetensors_torch().save(tensors, metadata=metadata))
    with atomic_write(path, what) as f:
        f.write(data)


def _sorted_header(data: bytes) -> bytes:
    """data with its header's metadata in sorted key order: safetensors keeps metadata in a hash map whose order
    changes from one call to the next, so the same tensors gave different bytes (and a different file hash).
    The tensors' entries keep their order and offsets (relative to the data, which follows unchanged)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + data[8 + size:]
