"""YAML files and `section.key=value` overrides into the dataclasses, and back to plain dicts for checkpoints.

Unknown keys and values of the wrong type are CaptionerErrors that name the key and list the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from pathlib import Path

import yaml

from captioner.config.sections import LEGACY_DEFAULTS, Config
from captioner.config.validate import validate
from captioner.errors import CaptionerError
from captioner.files import read_text


def valid_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def _unknown_key(key: str, cfg: Config) -> CaptionerError:
    keys = valid_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return CaptionerError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(keys)}")


def coerce(key: str, value, annotation):
    """Convert a YAML/CLI value to the field's declared type, or raise a one-line error."""
    hint = annotation
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if typing.get_origin(hint) is typing.Literal:  # a Switch: booleans are its "true" / "false"
        value = ("true" if value else "false") if isinstance(value, bool) else value
        if value in args:
            return value
        raise CaptionerError(f"config key '{key}' must be one of {', '.join(args)}, got {value!r}")
    if typing.get_origin(hint) is list:  # a list of strings: YAML [a, b] or "a,b" from the command line
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return items
        raise CaptionerError(f"config key '{key}' expects a list of names such as [a, b], got {value!r}")
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(target) is list:  # list[float]: a YAML list, or [0.5, 0.5, 0.5] on the command line
        item = typing.get_args(target)[0]
        if isinstance(value, (list, tuple)) and value:
            return [coerce(key, v, item) for v in value]
        raise CaptionerError(f"config key '{key}' expects a list of {item.__name__} such as [0.5, 0.5, 0.5], "
                             f"got {value!r}")
    if target in (int, float) and isinstance(value, str):
        try:  # YAML reads "1e-3" (no dot) as a string
            value = target(value)
        except ValueError:
            pass
    if target is bool and isinstance(value, bool):
        return value
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise CaptionerError(f"config key '{key}' expects {target.__name__}, got {value!r}")


@functools.cache
def _field_types(section_type: type) -> dict:
    """A section's annotations resolved to types, once per class (resolving them for every key set took seconds)."""
    return typing.get_type_hints(section_type)


def _set(cfg: Config, key: str, value) -> None:
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in {f.name for f in dataclasses.fields(cfg)} else None
    if section is None or name not in {f.name for f in dataclasses.fields(section)}:
        raise _unknown_key(key, cfg)
    annotation = _field_types(type(section))[name]
    setattr(section, name, coerce(key, value, annotation))


def from_dict(data: dict, cfg: Config | None = None) -> Config:
    """Apply a nested dict ({"encoder": {"layer": "layer3"}}) on top of cfg (defaults when None)."""
    cfg = cfg or Config()
    if not isinstance(data, dict):
        raise CaptionerError(f"config must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise _unknown_key(str(section), cfg) if not hasattr(cfg, str(section)) else CaptionerError(
                f"config section '{section}' must be a mapping of keys")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    validate(cfg)
    return cfg


def from_saved_dict(data: dict) -> Config:
    """A config saved in a checkpoint: keys it lacks (added since) take LEGACY_DEFAULTS, not today's defaults."""
    if not isinstance(data, dict):
        return from_dict(data)
    filled = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for section, legacy in LEGACY_DEFAULTS.items():
        if isinstance(filled.get(section, {}), dict):
            filled[section] = {**legacy, **filled.get(section, {})}
    return from_dict(filled)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings; the value is parsed as a YAML scalar (so 3, 1e-4, true, null work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CaptionerError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set(cfg, key.strip(), value)
    validate(cfg)
    return cfg


# Keys holding file or folder paths: relative ones in a config file are relative to that file's folder (as in
# docker-compose or mkdocs), so a config works from any working directory; on the command line they stay
# relative to the working directory, where the shell completed them.
PATH_KEYS = ("dataset.root", "dataset.annotations", "dataset.images", "dataset.splits", "dataset.train_list",
             "dataset.val_list", "dataset.test_list", "cache.dir", "encoder.weights")


_WEIGHTS_FILE = (".pth", ".pt", ".bin", ".safetensors")


def _relative_to(data, folder: Path):
    """data (the parsed YAML) with relative paths made absolute against folder."""
    if not isinstance(data, dict):
        return data
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = data.get(section, {}).get(name) if isinstance(data.get(section), dict) else None
        if not isinstance(value, str) or not value:
            continue
        if key == "encoder.weights" and not value.endswith(_WEIGHTS_FILE) and "/" not in value:
            continue  # a torchvision weights name (IMAGENET1K_V2), not a file
        data[section][name] = os.path.abspath(os.path.join(folder, os.path.expanduser(value)))  # absolute: kept
    return data


def shipped_config(name: str) -> Path | None:
    """A config that ships with captioner (tiny.yaml, ...): captioner/configs/ in an installed package,
    configs/ in a source checkout; None when there is none of that name."""
    package = Path(__file__).resolve().parent.parent  # captioner/
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config in YAML file path (a bare name such as tiny.yaml also finds the shipped one), with overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file() and path.parent == Path(".") and shipped_config(path.name):
            path = shipped_config(path.name)
        if not path.is_file():
            raise CaptionerError(f"config file {path} not found")
        try:
            data = yaml.safe_load(read_text(path, "config file", setting="")) or {}
        except yaml.YAMLError as e:
            raise CaptionerError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        try:
            from_dict(_relative_to(data, path.parent), cfg)
        except CaptionerError as e:
            raise CaptionerError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Encoder keys that a config may leave to the weights (None or ""); a checkpoint records the values it trained with.
PREPROCESS_KEYS = ("mean", "std", "interpolation")


def inherit_preprocess(new: dict, saved: dict) -> dict:
    """Config dict new with saved's encoder.mean, std and interpolation where new leaves them to the weights: a
    run that continues a checkpoint (or a run folder) normalises images as it was trained, whatever the weights'
    library says today, and a config that never set them matches one that recorded them."""
    encoder = new.get("encoder") if isinstance(new.get("encoder"), dict) else {}
    old = saved.get("encoder") if isinstance(saved, dict) and isinstance(saved.get("encoder"), dict) else {}
    filled = {k: old[k] for k in PREPROCESS_KEYS if encoder.get(k) in (None, "") and old.get(k) not in (None, "")}
    return {**new, "encoder": {**encoder, **filled}} if filled else new
