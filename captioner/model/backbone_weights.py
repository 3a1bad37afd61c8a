"""A weights file's state_dict into a backbone, for every source (torchvision, timm, open_clip).

    state = read_encoder_weights("convnext_tiny.safetensors")     # .safetensors, .pth, .pt or .bin
    load_state(model, state, "timm/convnext_tiny", "convnext_tiny.safetensors", layer="stages.3")

Files are read by captioner/weights.py (never running pickled code); here wrapper prefixes are removed, keys
saved under other names are matched by order, and a file may lack the modules after the hooked layer (a
backbone saved without its classifier head): they are never computed behind the hook.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from captioner.errors import CaptionerError
from captioner.weights import WEIGHT_SUFFIXES, read_state_dict


def strip_wrapper_prefixes(state: dict) -> dict:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def looks_like_file(weights: str) -> bool:
    """Whether encoder.weights names a file rather than a library's weights name or tag."""
    return weights.endswith(WEIGHT_SUFFIXES) or "/" in weights or "\\" in weights or Path(weights).exists()


def read_encoder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in an encoder weights file (captioner/weights.py, the one reader: .safetensors, or
    .pth/.pt/.bin through torch.load(weights_only=True)), DDP / torch.compile key prefixes removed."""
    return strip_wrapper_prefixes(read_state_dict(path, "encoder weights file"))


def remap_onto(source: dict, template: dict, arch: str, prefix: str = "") -> dict:
    """A state_dict saved under other key names -> template's names (a backbone's state_dict), by order and shape.

    source's tensors, in their saved order, fill template's keys that start with prefix (e.g. "features." for a
    MobileNetV2 saved without its classifier), in definition order; any count or shape mismatch is an error.
    """
    targets = [k for k in template if k.startswith(prefix)]
    if len(targets) != len(source):
        raise CaptionerError(f"{len(source)} saved tensors cannot fill the {len(targets)} tensors of {arch} "
                             f"under '{prefix}'")
    out = {}
    for (name, tensor), target in zip(source.items(), targets):
        if tuple(tensor.shape) != tuple(template[target].shape):
            raise CaptionerError(f"saved tensor {name} {tuple(tensor.shape)} does not fit {arch}'s {target} "
                                 f"{tuple(template[target].shape)}")
        out[target] = tensor
    return out


def after_layer(model: nn.Module, layer: str | None) -> set[str]:
    """Parameter and buffer names of the modules defined after the hooked layer: never computed."""
    names = [name for name, _ in model.named_modules()]  # definition (= forward) order, parents first
    if not layer or layer not in names:
        return set()
    end = max(i for i, name in enumerate(names) if name == layer or name.startswith(layer + "."))
    later = set(names[end + 1:])
    return {key for key in model.state_dict() if key.rpartition(".")[0] in later}


def load_state(model: nn.Module, state: dict, arch: str, weights: str, layer: str | None) -> None:
    """Load state into model; it may lack the modules after the hooked layer (never computed): those become
    zeros, not their random init, so the encoder is the same whatever the seed and a feature cache's weights
    fingerprint still matches it."""
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    needed = [k for k in missing if k not in after_layer(model, layer)]
    if needed or unexpected:
        what = "; ".join(filter(None, [f"missing keys {', '.join(needed[:3])}" if needed else "",
                                       f"unexpected keys {', '.join(unexpected[:3])}" if unexpected else ""]))
        raise CaptionerError(f"encoder weights {weights} do not fit {arch}: {what}")
    template = model.state_dict()
    state = {**{k: torch.zeros_like(template[k]) for k in missing}, **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(e)
        raise CaptionerError(f"encoder weights {weights} do not fit {arch}: {first}") from None
