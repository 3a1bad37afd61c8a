"""Defaults that depend on something: a key that follows another one, and the measured defaults that a run
continuing an older checkpoint keeps at the checkpoint's values.

    cfg = resolve_defaults(cfg)  # train.val_beam_size 0 -> decode.beam_size
    data = inherit_old_defaults(to_dict(cfg), checkpoint["config"], stated_keys(path, overrides))
"""
from __future__ import annotations

from captioner.config.sections import DEFAULTS_BEFORE_MEASURED, LEGACY_DEFAULTS, Config

# Keys whose 0 means "the value of another key": resolved once a config is complete (load_config after the
# overrides, from_saved_dict, train), so a run's config.yaml and checkpoint record the number it used.
FOLLOWING_KEYS = {"train.val_beam_size": "decode.beam_size"}


def resolve_defaults(cfg: Config) -> Config:
    """cfg with each FOLLOWING_KEYS key left at 0 set to the value of the key it follows (in place)."""
    for key, followed in FOLLOWING_KEYS.items():
        (section, name), (other, source) = key.split("."), followed.split(".")
        if getattr(getattr(cfg, section), name) == 0:
            setattr(getattr(cfg, section), name, getattr(getattr(cfg, other), source))
    return cfg


def inherit_old_defaults(new: dict, saved: dict, stated: set[str] | None) -> dict:
    """Config dict new where a run continues a checkpoint whose config is saved (--init-from, --resume --config):
    each DEFAULTS_BEFORE_MEASURED key that new does not state (stated: the keys its file and overrides give;
    None: all stated, a Config built in code) and that saved has at its old default (written before the measured
    defaults, or a key it lacks) keeps that old value, so an old model is not trained on with new settings."""
    if stated is None or not isinstance(saved, dict):
        return new
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in new.items()}
    for section, old_defaults in DEFAULTS_BEFORE_MEASURED.items():
        recorded = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for name, old in old_defaults.items():
            value = recorded.get(name, LEGACY_DEFAULTS[section][name])
            if f"{section}.{name}" not in stated and value == old and isinstance(out.get(section), dict):
                out[section][name] = old
    return out
