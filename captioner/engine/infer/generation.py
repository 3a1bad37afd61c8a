"""Generation settings for one call: keyword arguments (or a request's text fields) -> DecodeSettings, checked by
the config's own rules, so `caption(img, beam_size=5)` and `decode.beam_size=5` can never be validated apart.

    settings = generation_settings(cfg, predictor.settings, compute, {"beam_size": 5, "max_len": 8})
    settings = generation_settings(cfg, predictor.settings, compute, {"top_p": "0.9"}, as_text=True)  # a form

The names are decode.*'s keys (DecodeConfig, without batch_size, which is how many images share a batch, not how a
caption is chosen). transformers' `generate` names are accepted for the same settings: num_beams (beam_size),
max_new_tokens (max_len, counted in words; <end> is not one) and do_sample (sample). Each value goes through the
config's coercion and validate(): a bad one is the CaptionerError a config file or an override would give, naming
decode.KEY. Settings not given keep the caller's (the model's decode section, with any load-time beam size).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TypedDict

from captioner.config import Config, DecodeConfig, apply_overrides, from_dict
from captioner.engine.infer.predict import DecodeSettings
from captioner.engine.runtime.compute import Compute
from captioner.errors import CaptionerError

GENERATION_KEYS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.name != "batch_size")
ALIASES = {"num_beams": "beam_size", "max_new_tokens": "max_len", "do_sample": "sample"}  # transformers' names


class GenerationOptions(TypedDict, total=False):
    """The keyword arguments of Captioner.caption / stream that choose how captions are generated (for type
    checkers: `**generation: Unpack[GenerationOptions]`)."""
    beam_size: int  # 1 is greedy
    max_len: int  # longest caption, in words
    length_penalty: float  # beam ranking: 0 by total log-probability; 1 by mean per word
    block_ngram: int  # > 0: no caption repeats one of its n-grams
    suppress_unk: bool  # never write <unk>
    sample: bool  # draw each word from the model's distribution
    temperature: float  # sampling: < 1 sharper, > 1 more varied
    top_k: int  # sampling: the k likeliest words only (0: off)
    top_p: float  # sampling: the nucleus of probability top_p only (1.0: off)
    num_return_sequences: int  # captions per image, best first: n best beams (n <= beam_size) or n samples
    groups: int  # diverse beam search: beam groups
    diversity: float  # diverse beam search: penalty per earlier group that chose the same word
    num_beams: int  # = beam_size (transformers' name)
    max_new_tokens: int  # = max_len
    do_sample: bool  # = sample


@dataclasses.dataclass(kw_only=True)
class GenerationFields:
    """The decode.* options the caption and evaluate jobs take for one run (their XJob inherits these; caption
    adds num_return_sequences); None / False: the checkpoint's. Keyword-only, so they never move a job's positional
    fields. sample and temperature go to Predictor.load (load_for_job), the others through given_options."""
    sample: bool = False  # draw each word from the model's distribution instead of greedy/beam
    temperature: float | None = None  # sampling only; None: the checkpoint's decode.temperature
    max_len: int | None = None
    length_penalty: float | None = None
    block_ngram: int | None = None
    suppress_unk: bool | None = None
    top_k: int | None = None
    top_p: float | None = None


# What the caption and evaluate jobs take as options beyond --beam, --sample and --temperature (which
# Predictor.load applies); None: not given.
JOB_KEYS = ("max_len", "length_penalty", "block_ngram", "suppress_unk", "top_k", "top_p", "num_return_sequences")


def given_options(job) -> dict:
    """job's JOB_KEYS fields that were given (not None): the options for Predictor.settings_for."""
    return {key: getattr(job, key) for key in JOB_KEYS if getattr(job, key, None) is not None}


def decode_keys(options: dict) -> dict:
    """options by decode.* key: aliases resolved; an unknown name, or one setting given twice, refused."""
    out: dict = {}
    for name, value in options.items():
        key = ALIASES.get(name, name)
        if key not in GENERATION_KEYS:
            valid = ", ".join(GENERATION_KEYS + tuple(ALIASES))
            raise CaptionerError(f"unknown generation setting {name!r}; valid: {valid}")
        if key in out:
            given = [n for n in options if ALIASES.get(n, n) == key]
            raise CaptionerError(f"{' and '.join(given)} are the same setting (decode.{key}): give one")
        out[key] = value
    return out


def generation_settings(cfg: Config, settings: DecodeSettings, compute: Compute, options: dict,
                        as_text: bool = False) -> DecodeSettings:
    """settings with options applied (settings itself when there are none), checked as cfg's decode section
    would be. cfg: the model's config (only its decode section is read, on a copy); settings: what it decodes
    with now; as_text: the values are text to parse as an override's (a form's fields), else Python values."""
    if not options:
        return settings
    decode = decode_keys(options)
    base = copy.deepcopy(cfg)
    for f in dataclasses.fields(base.decode):  # start from what the caller decodes with, not the file's values
        if hasattr(settings, f.name):
            setattr(base.decode, f.name, getattr(settings, f.name))
    if "groups" not in decode and _whole(decode.get("beam_size")) % base.decode.groups:
        decode["groups"] = 1  # as DecodeSettings.of: a beam size the model's groups do not divide has none
    if as_text:
        apply_overrides(base, [f"decode.{key}={value}" for key, value in decode.items()])
    else:
        from_dict({"decode": decode}, base)
    return DecodeSettings.of(base, compute=compute)


def _whole(value) -> int:
    """value as a whole number where it reads as one (5, "5"), else 0: the coercion names what is wrong with it."""
    try:
        return int(value) if not isinstance(value, (bool, float)) else 0
    except (TypeError, ValueError):
        return 0
