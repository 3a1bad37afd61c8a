"""A model folder's config.json held to what `captioner export` wrote: every key the model, its preprocessing and
its decoding depend on is present (never filled by today's default), well typed, and the informational top-level
blocks (`preprocessing`, `decode`, `architecture`, read by tools without captioner) agree with `config`.

A .pt checkpoint's config is not checked this way: it may come from a training config that legitimately leaves
defaults out (config.from_saved_dict fills them).

    check_folder_config(meta, Path("model/config.json"))  # CaptionerError in one line, naming the key
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from captioner.config import Config, from_saved_dict, what_is_valid
from captioner.errors import CaptionerError

# The sections the model, its preprocessing and its decoding are built from: each key is required.
REQUIRED_SECTIONS = ("encoder", "model", "decode")

# Keys added after format_version 1 began (29720ed, "Model folders"): a format-1 folder exported before them lacks
# them legitimately, and loads them as it always did (LEGACY_DEFAULTS, else the key's default). A folder whose
# top-level block states such a key must have it in `config` too (_check_agreement).
ADDED_IN_FORMAT_1 = {"encoder": {"mean", "std", "interpolation"},
                     "decode": {"block_ngram", "suppress_unk", "groups", "diversity", "top_k", "top_p",
                                "num_return_sequences"}}

# top-level preprocessing key -> config.encoder key (the rest of the block is prose for other tools)
PREPROCESSING_KEYS = {"image_size": "image_size", "interpolation": "interpolation", "mean": "mean", "std": "std"}
ARCHITECTURE_KEYS = {"encoder": "arch", "layer": "layer"}


def check_folder_config(meta: dict, path: Path) -> None:
    """meta (config.json's content, its `config` a dict) as export writes it, or one CaptionerError naming path and
    the dotted key."""
    config = meta["config"]
    _check_keys(config, meta["format_version"], path)
    _check_no_numeric_text(config, path)
    try:
        from_saved_dict(config)  # types and ranges, with the config layer's own checks
    except CaptionerError as e:
        raise CaptionerError(f"{path}: {e}") from None
    _check_agreement(meta, path)


def _sections() -> dict[str, list[str]]:
    cfg = Config()
    return {s.name: [f.name for f in dataclasses.fields(getattr(cfg, s.name))] for s in dataclasses.fields(cfg)}


def _unknown(path: Path, key: str) -> CaptionerError:
    return CaptionerError(f"{path}: unknown key {key} ({what_is_valid(key.removeprefix('config.'))})")


def _check_keys(config: dict, version: int, path: Path) -> None:
    sections = _sections()
    for section, values in config.items():
        if section not in sections:
            raise _unknown(path, f"config.{section}")
        if not isinstance(values, dict):
            raise CaptionerError(f"{path}: config.{section} must be a mapping of keys, got {type(values).__name__}")
        for key in values:
            if key not in sections[section]:
                raise _unknown(path, f"config.{section}.{key}")
    for section in REQUIRED_SECTIONS:
        if section not in config:
            raise CaptionerError(f"{path}: config.{section} is missing (export writes every section)")
        optional = ADDED_IN_FORMAT_1.get(section, set()) if version == 1 else set()
        missing = [k for k in sections[section] if k not in config[section] and k not in optional]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CaptionerError(f"{path}: config.{section}.{missing[0]} is missing{more}")


def _check_no_numeric_text(config: dict, path: Path) -> None:
    """JSON writes numbers as numbers: text where one is expected was edited in (the config layer turns YAML 1.1's
    1e-3, read as text, into a float; config.json never needs that)."""
    cfg = Config()
    for section, values in config.items():
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        for key, value in values.items():
            kinds = set(typing.get_args(hints[key]) or (hints[key],)) - {type(None)}
            if isinstance(value, str) and kinds and kinds <= {int, float}:
                kind = "int (a whole number)" if int in kinds else "float (a number)"
                raise CaptionerError(f"{path}: config.{section}.{key} expects {kind}, got the text {_short(value)}")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))  # JSON's float text round-trips; leave it slack
    return a == b


def _disagree(path: Path, block_key: str, block_value, config_key: str, config_value) -> CaptionerError:
    return CaptionerError(f"{path}: {block_key} ({_short(block_value)}) disagrees with {config_key} "
                          f"({_short(config_value)}); export the folder again")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_agreement(meta: dict, path: Path) -> None:
    """Where the top-level blocks are present, each value they state equals config's (config's None or "" means
    the weights' own value, which only the built model knows: check_model_preprocessing)."""
    encoder, decode = meta["config"].get("encoder", {}), meta["config"].get("decode", {})
    checks = [("preprocessing", PREPROCESSING_KEYS, "encoder", encoder),
              ("architecture", ARCHITECTURE_KEYS, "encoder", encoder)]
    if isinstance(meta.get("decode"), dict):
        checks.append(("decode", {k: k for k in meta["decode"]}, "decode", decode))
    for block, keys, section, values in checks:
        stated = meta.get(block)
        if stated is None:
            continue
        if not isinstance(stated, dict):
            raise CaptionerError(f"{path}: {block} must be a mapping, got {type(stated).__name__}")
        for key, config_key in keys.items():
            if key not in stated:
                continue
            if config_key not in values:
                raise CaptionerError(f"{path}: config.{section}.{config_key} is missing ({block}.{key} states it)")
            if values[config_key] in (None, "") and block == "preprocessing":
                continue
            if not _same(stated[key], values[config_key]):
                raise _disagree(path, f"{block}.{key}", stated[key], f"config.{section}.{config_key}",
                                values[config_key])


def check_model_preprocessing(meta: dict, encoder, path: Path) -> None:
    """The built model's preprocessing (config's None/"" resolved to the weights' own) against the preprocessing
    block, where it is present."""
    stated = meta.get("preprocessing")
    if not isinstance(stated, dict):
        return
    actual = {"image_size": encoder.image_size, "interpolation": encoder.interpolation,
              "mean": list(encoder.preprocess.mean), "std": list(encoder.preprocess.std)}
    for key, value in actual.items():
        if key in stated and not _same(stated[key], value):
            raise _disagree(path, f"preprocessing.{key}", stated[key], f"the model's {key} from config.encoder",
                            value)
