"""The Python API's arguments, checked by the rules of the config keys they stand for.

`Captioner.from_pretrained(temperature=...)` and `decode.temperature:` in a config file accept the same values
and refuse the others with the same words: each argument is coerced by config/load.py `coerce` and range-checked
by config/validate.py `validate`, the config file's own rules, so there is one rule set. The line names the
argument as the caller typed it:

    check_arguments(temperature=float("inf"))   # CaptionerError: argument temperature must be a finite number, got inf
    check_arguments(beam_size=0)                # CaptionerError: beam_size=0: decode.beam_size must be >= 1, got 0

Python callers pass numbers, not text: "0.5" for a number is refused (a config file's "1e-3" is text only
because YAML reads it so). NumPy numbers count as Python's.
"""
from __future__ import annotations

import dataclasses
import os
import typing

import numpy as np
import torch

from captioner.config import ComputeConfig, Config, coerce, from_dict, require_min, validate
from captioner.config.validate import check_text
from captioner.errors import CaptionerError

# API argument -> the config key whose rules it follows.
CONFIG_KEYS = {"beam_size": "decode.beam_size", "batch_size": "decode.batch_size", "sample": "decode.sample",
               "temperature": "decode.temperature", "num_workers": "compute.num_workers"}


def check_arguments(**values) -> dict:
    """values (None: not given, kept as None) -> the same values as the config would hold them; one line naming
    the first argument its config key would refuse."""
    cfg = Config()
    checked = {}
    for name, value in values.items():
        if value is None:
            checked[name] = None
            continue
        section_name, _, key = CONFIG_KEYS[name].partition(".")
        section = getattr(cfg, section_name)
        annotation = typing.get_type_hints(type(section))[key]
        spec = next(f for f in dataclasses.fields(section) if f.name == key)
        value = _plain(value)
        if isinstance(value, str) and annotation in (int, float):
            raise CaptionerError(f"argument {name} must be a number, got the text {value[:40]!r}")
        setattr(section, key, coerce(CONFIG_KEYS[name], value, annotation, spec, label=f"argument {name}"))
        try:
            validate(cfg)  # the config file's range rules, on a config that differs from the defaults by this value
        except CaptionerError as e:
            raise CaptionerError(f"{name}={getattr(section, key)!r}: {e}") from None
        checked[name] = getattr(section, key)
    return checked


def check_flag(name: str, value) -> bool:
    """A True/False argument (attention=, sample=): a bool, as a config file's true/false."""
    return coerce(name, _plain(value), bool, label=f"argument {name}")


def check_count(name: str, value, low: int) -> int:
    """An integer argument without a config key (max_pixels): the config's int rule, and at least low."""
    value = coerce(name, _plain(value), int, label=f"argument {name}")
    require_min((name, value, low))
    return value


def check_compute(compute) -> ComputeConfig | None:
    """compute=: None (the model's own, auto), a ComputeConfig or a dict of compute keys ({"bf16": "false"}),
    checked as the compute: section of a config file."""
    if compute is None:
        return None
    if isinstance(compute, ComputeConfig):
        compute = dataclasses.asdict(compute)
    if not isinstance(compute, dict):
        raise CaptionerError(f"compute must be a ComputeConfig or a dict of compute keys (e.g. "
                             f"{{'bf16': 'false'}}), got {type(compute).__name__} {str(compute)[:40]!r}")
    try:
        return from_dict({"compute": compute}).compute
    except CaptionerError as e:
        raise CaptionerError(f"compute: {e}") from None


def check_model_name(model) -> None:
    """model=: a path (str or os.PathLike) or a Hub repo id; never None, a number or bytes."""
    if not isinstance(model, (str, os.PathLike)):
        raise CaptionerError(f"model must be a checkpoint, a model folder or a Hub repo id (a str or a path), "
                             f"got {type(model).__name__}")
    path = os.fspath(model)
    if not isinstance(path, str):
        raise CaptionerError(f"model must be a path given as text, got {type(path).__name__}")
    check_text("model", path)
    if not path.strip():
        raise CaptionerError("model is empty: give a checkpoint, a model folder or a Hub repo id")


def check_device(device) -> str | torch.device | None:
    """device=: None, "auto", a device name ("cpu", "cuda:1"), a torch.device or a GPU index (0: "cuda:0", as
    torch takes it); the name is resolved (and refused when this machine lacks it) later."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return f"cuda:{device}"
    if not isinstance(device, str):
        raise CaptionerError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', a GPU index or a torch.device, got "
                             f"{type(device).__name__} {str(device)[:40]!r}")
    return check_text("device", device)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise CaptionerError(f"{name} must be one of {', '.join(choices)}, got {str(value)[:40]!r}")
    return value


def check_optional_text(name: str, value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise CaptionerError(f"{name} must be text (a branch, tag or commit) or None, got {type(value).__name__}")
    return value if value is None else check_text(name, value)


def _plain(value):
    """NumPy scalars as Python's (np.int64(3) counts as 3, np.bool_(True) as True); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)) else value
