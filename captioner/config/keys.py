"""The keys a config has, and what to say of one it lacks: its closest valid key and its section's keys, in a
line short enough to read (all 94 keys would be 1,500 characters)."""
from __future__ import annotations

import dataclasses
import difflib

from captioner.config.sections import Config
from captioner.errors import CaptionerError


def valid_keys(cfg: Config | None = None) -> list[str]:
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


# A section with more keys than this is named, not listed: the line stays readable (train has 37 keys)
LISTED_KEYS = 16


def what_is_valid(key: str, cfg: Config | None = None) -> str:
    """For an unknown dotted key: the closest valid keys, then the keys of its section (or the sections, when the
    section itself is unknown), in one short phrase; the whole list of 94 keys would be a 1,500-character line."""
    cfg = cfg or Config()
    sections = {s.name: [f"{s.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, s.name))]
                for s in dataclasses.fields(cfg)}
    section, _, name = key.partition(".")
    if section in sections:  # the name alone: a shared 'encoder.' makes any two keys of a section look alike
        names = [k.partition(".")[2] for k in sections[section]]
        close = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=2, cutoff=0.75)]
    else:
        close = difflib.get_close_matches(key, [*valid_keys(cfg), *sections], n=2, cutoff=0.75)
    hint = f"did you mean {', '.join(close)}? " if close else ""  # a loose guess misleads more than none
    if section not in sections:
        return f"{hint}sections: {', '.join(sections)}"
    keys = sections[section]
    if len(keys) > LISTED_KEYS:
        return f"{hint}{section} has {len(keys)} keys, listed in docs/reference/configuration.md and by --print-config"
    return f"{hint}{section} keys: {', '.join(k.partition('.')[2] for k in keys)}"


def unknown_key(key: str, cfg: Config) -> CaptionerError:
    return CaptionerError(f"unknown config key '{key}' ({what_is_valid(key, cfg)})")
