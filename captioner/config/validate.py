"""Range and value checks: a bad value fails when the config is read, with what is valid, never deep in a run."""
from __future__ import annotations

import codecs
import dataclasses
import math
import typing

from captioner.config.sections import (DATASET_FORMATS, INT_MAX, INTERPOLATIONS, LOGGERS, LR_SCHEDULES, OBJECTIVES,
                                       SCST_BASELINES, SELECT_METRICS, TEMPERATURES, Config)
from captioner.errors import CaptionerError


# The range of every int key and option unless its dataclass field says otherwise (metadata "range": (low,
# high), sections.at_least): counts, sizes and seeds are never negative, and 2**31 - 1 keeps every seed (+ rank,
# + epoch) inside NumPy's and torch's generators and every size inside a 32-bit index.
INT_RANGE = (0, INT_MAX)


def int_range(spec: dataclasses.Field | None) -> tuple[int, int]:
    return spec.metadata.get("range", INT_RANGE) if spec is not None else INT_RANGE


def check_number(name: str, value, spec: dataclasses.Field | None = None):
    """value, or a one-line error: an int outside its field's range, a float that is NaN or infinite (unless
    the field's metadata says "infinite": True, where infinity means something) or outside a declared range."""
    low, high = int_range(spec) if isinstance(value, int) else (spec.metadata.get("range", (None, None))
                                                                 if spec is not None else (None, None))
    if isinstance(value, float) and not math.isfinite(value) and not (
            spec is not None and spec.metadata.get("infinite") and not math.isnan(value)):
        raise CaptionerError(f"{_named(name)} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        shown = f"an integer of {value.bit_length()} bits" if isinstance(value, int) and value.bit_length() > 64 \
            else value
        # below: the real lower bound alone (">= 1", never "between 0 and ..." for a count that starts at 1)
        bound = f">= {low}" if low is not None and value < low else \
            f"between {low} and {high}" if low is not None else f"<= {high}"
        note = spec.metadata.get("note") if spec is not None else ""
        raise CaptionerError(f"{_named(name)} must be {bound}{f' ({note})' if note else ''}, got {shown}")
    return value


def check_text(name: str, value: str) -> str:
    """value, or a one-line error when it holds a NUL character, which no path, name or encoding can hold."""
    if "\x00" in value:
        raise CaptionerError(f"{_named(name)} holds a NUL character (\\0), which no path or name can hold")
    return value


def _named(name: str) -> str:
    """An option (--beam) or an already worded name (config key 'x') as it is; a bare key as config key 'x'."""
    return name if name.startswith("-") or " " in name else f"config key '{name}'"


def check_fields(cls, values: dict, option_name=lambda field: field) -> None:
    """The checks coerce makes on config keys, made on the values a dataclass (a job's options) is about to be
    built with: every int within its field's range, every float finite, no NUL in text. Derived from the field
    types, so a field added later is checked too; option_name turns a field name into what the user typed
    (beam_size -> --beam)."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        value = values.get(spec.name)
        if value is None or isinstance(value, bool):
            continue
        kinds = _plain_types(hints[spec.name])
        if (isinstance(value, int) and int in kinds) or (isinstance(value, float) and float in kinds):
            check_number(option_name(spec.name), value, spec)
        elif isinstance(value, str) and str in kinds:
            check_text(option_name(spec.name), value)


def _plain_types(hint) -> set:
    args = typing.get_args(hint)
    return {a for a in (args or (hint,)) if a in (int, float, str)}


def require_min(*checks: tuple[str, int | float | None, int | float]) -> None:
    """The range checks every command makes on its options: ("--beam", 0, 1) -> "--beam must be >= 1, got 0".
    None means "not given" and passes; NaN and infinity never do."""
    for name, value, low in checks:
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CaptionerError(f"{name} must be a finite number >= {low}, got {value}")
        if value < low:
            raise CaptionerError(f"{name} must be >= {low}, got {value}")


# What a trained checkpoint's config can still change: where the data is, how to decode, how to compute.
CHECKPOINT_SECTIONS = ("dataset", "decode", "compute", "cache")


def check_checkpoint_overrides(overrides: list[str]) -> None:
    """Refuse overrides that cannot apply to a trained checkpoint (its encoder, model shape and training)."""
    fixed = [o for o in overrides if o.partition("=")[0].strip().partition(".")[0] not in CHECKPOINT_SECTIONS]
    if fixed:
        raise CaptionerError(f"{', '.join(fixed)}: a trained checkpoint's encoder, model and training settings are "
                             f"fixed; only {', '.join(s + '.*' for s in CHECKPOINT_SECTIONS)} overrides apply here")


def _known_encoding(name: str) -> bool:
    try:
        return not name or codecs.lookup(name).name not in ("base64", "hex", "zlib", "bz2", "rot-13", "quopri", "uu")
    except LookupError:
        return False


def return_sequences_problem(num_return_sequences: int, beam_size: int, sample: bool) -> str:
    """Why decode.num_return_sequences cannot be met by this search, or "": greedy decoding finds one caption, a
    beam search at most beam_size (as transformers' generate refuses num_return_sequences > num_beams)."""
    if sample or num_return_sequences <= beam_size:
        return ""
    return (f"decode.num_return_sequences ({num_return_sequences}) needs decode.sample=true or a beam search "
            f"with at least that many beams (decode.beam_size {beam_size})")


def _check_ranges(cfg: Config) -> None:
    """Every number within its field's range (INT_RANGE or at_least's), as coerce checks keys read from text: a
    Config built in code gets the same refusals, with the same bound."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for spec in dataclasses.fields(values):
            value = getattr(values, spec.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                check_number(f"{section.name}.{spec.name}", value, spec)


def validate(cfg: Config) -> None:
    """Reject values that would only fail later, deep inside a run."""
    _check_ranges(cfg)
    low, high = TEMPERATURES
    sequences_problem = return_sequences_problem(cfg.decode.num_return_sequences, cfg.decode.beam_size,
                                                 cfg.decode.sample)
    checks = [
        (cfg.encoder.interpolation in ("", *INTERPOLATIONS),
         f"encoder.interpolation must be {', '.join(INTERPOLATIONS)} or \"\" (the weights' own), got "
         f"'{cfg.encoder.interpolation}'"),
        (all(values is None or len(values) == cfg.encoder.in_channels
             for values in (cfg.encoder.mean, cfg.encoder.std)),
         f"encoder.mean and encoder.std need one value per input channel (encoder.in_channels="
         f"{cfg.encoder.in_channels}), got {cfg.encoder.mean} and {cfg.encoder.std}"),
        (cfg.encoder.std is None or all(v > 0 for v in cfg.encoder.std),
         f"encoder.std must be > 0, got {cfg.encoder.std}"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (cfg.model.alpha_c >= 0, "model.alpha_c must be >= 0"),
        (cfg.model.features in ("project", "norm", "raw"),
         f"model.features must be project, norm or raw, got '{cfg.model.features}'"),
        (cfg.model.attention in ("tanh", "relu"), f"model.attention must be tanh or relu, got '{cfg.model.attention}'"),
        (cfg.model.init_state in ("tanh", "linear"),
         f"model.init_state must be tanh or linear, got '{cfg.model.init_state}'"),
        (cfg.dataset.format in DATASET_FORMATS,
         f"dataset.format must be one of: {', '.join(DATASET_FORMATS)}; got '{cfg.dataset.format}'"),
        (not (cfg.dataset.format == "synthetic" and cfg.dataset.annotations),
         "dataset.format=synthetic ignores dataset.annotations: set dataset.format=auto (or the file's format)"),
        (cfg.dataset.restval in ("train", "drop"), "dataset.restval must be train or drop"),
        (_known_encoding(cfg.dataset.encoding),
         f"dataset.encoding {cfg.dataset.encoding!r} is not a text encoding Python knows "
         f"(e.g. utf-8, latin-1, cp1252)"),
        (0.0 <= cfg.dataset.max_missing_fraction <= 1.0, "dataset.max_missing_fraction must be in [0, 1]"),
        (0.0 <= cfg.dataset.val_fraction < 0.5, "dataset.val_fraction must be in [0, 0.5)"),
        (cfg.train.lr > 0, f"train.lr must be > 0, got {cfg.train.lr}"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.train.lr_schedule in LR_SCHEDULES,
         f"train.lr_schedule must be one of: {', '.join(LR_SCHEDULES)}, got '{cfg.train.lr_schedule}'"),
        (0.0 <= cfg.train.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (0.0 < cfg.train.lr_gamma <= 1.0, "train.lr_gamma must be in (0, 1]"),
        (cfg.train.select_metric in SELECT_METRICS,
         f"train.select_metric must be one of: {', '.join(SELECT_METRICS)}, got '{cfg.train.select_metric}'"),
        (cfg.train.encoder_lr > 0, f"train.encoder_lr must be > 0, got {cfg.train.encoder_lr}"),
        (cfg.train.objective in OBJECTIVES,
         f"train.objective must be one of: {', '.join(OBJECTIVES)}, got '{cfg.train.objective}'"),
        (cfg.train.scst_baseline in SCST_BASELINES,
         f"train.scst_baseline must be one of: {', '.join(SCST_BASELINES)}, got '{cfg.train.scst_baseline}'"),
        (cfg.train.scst_samples >= (2 if cfg.train.scst_baseline == "mean" else 1),
         f"train.scst_samples must be >= 2 with the mean baseline (>= 1 with greedy), got {cfg.train.scst_samples}"),
        (cfg.train.scst_entropy >= 0, "train.scst_entropy must be >= 0"),
        (cfg.train.scst_diversity >= 0, f"train.scst_diversity must be >= 0, got {cfg.train.scst_diversity}"),
        (cfg.train.scst_xe_weight >= 0, f"train.scst_xe_weight must be >= 0, got {cfg.train.scst_xe_weight}"),
        (low <= cfg.train.scst_temperature <= high,  # decode.temperature's range, for the same reason
         f"train.scst_temperature must be in [{low:g}, {high:g}] (log-probabilities / T: below {low:g} sampling is "
         f"greedy to float precision, far below it they overflow to -inf), got {cfg.train.scst_temperature}"),
        (0.0 <= cfg.train.label_smoothing < 1.0,
         f"train.label_smoothing must be in [0, 1), got {cfg.train.label_smoothing}"),
        (0.0 <= cfg.train.ema_decay < 1.0,
         f"train.ema_decay must be in [0, 1) (0: no weight averaging; 0.99 averages about the last 100 steps), "
         f"got {cfg.train.ema_decay}"),
        (all(name in LOGGERS for name in cfg.train.log_to) and len(set(cfg.train.log_to)) == len(cfg.train.log_to),
         f"train.log_to takes each of {', '.join(LOGGERS)} at most once, e.g. [jsonl, mlflow]; got "
         f"[{', '.join(cfg.train.log_to)}]"),
        (low <= cfg.decode.temperature <= high,
         f"decode.temperature must be in [{low:g}, {high:g}], got {cfg.decode.temperature}"),
        (cfg.decode.groups < 1 or cfg.decode.beam_size % cfg.decode.groups == 0,
         f"decode.beam_size ({cfg.decode.beam_size}) must be a multiple of decode.groups ({cfg.decode.groups})"),
        (cfg.decode.diversity >= 0, f"decode.diversity must be >= 0, got {cfg.decode.diversity}"),
        (0.0 < cfg.decode.top_p <= 1.0, f"decode.top_p must be in (0, 1] (1: off), got {cfg.decode.top_p}"),
        (not sequences_problem, sequences_problem),
        (cfg.cache.dtype in ("bfloat16", "float32"),
         f"cache.dtype must be bfloat16 or float32 (float16 overflows random-weight features), not {cfg.cache.dtype}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CaptionerError(message)
