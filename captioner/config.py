"""Typed configuration: YAML files in configs/ load into these dataclasses; `key=value` overrides any field.

    cfg = load_config("configs/tiny.yaml", ["encoder.layer=layer3", "train.epochs=2"])

Unknown keys and values of the wrong type are CaptionerErrors that name the key and list the valid ones.
"""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from captioner.errors import CaptionerError
from captioner.files import read_text


@dataclass
class EncoderConfig:
    arch: str = "resnet152"  # any torchvision classification CNN with named modules (resnet18/50/101/152, ...)
    layer: str = "layer4"  # module whose output is taken by a forward hook; see `captioner layers ARCH`
    weights: str | None = None  # None (random init), a torchvision enum name (IMAGENET1K_V2) or a local .pth path
    in_channels: int = 3  # != 3 replaces conv1 (e.g. 11-band satellite images)
    image_size: int = 224  # images are resized to image_size x image_size; 224 gives a 7x7 layer4 grid
    finetune_from: str | None = None  # None keeps the backbone frozen; e.g. layer4 trains it and what follows, up to the hook
    seed: int = 0  # random-init weights (weights: null) come from this seed, in train and extract alike


@dataclass
class ModelConfig:
    embed_dim: int = 512  # word embedding size, also the size features are projected to
    attention_dim: int = 512
    decoder_dim: int = 512  # LSTM hidden size
    dropout: float = 0.5
    alpha_c: float = 1.0  # weight of the doubly stochastic attention regulariser (Show, Attend and Tell eq. 14)
    # What the decoder attends over (docs/quality.md): norm, a LayerNorm over all C encoder channels (unit scale
    # even for random-init weights); project, Linear to embed_dim + LayerNorm (the first default: fewer distinct
    # captions on real photos); raw, the activations as they are (pretrained weights only)
    features: str = "norm"
    attention: str = "tanh"  # additive attention's nonlinearity: tanh (Bahdanau) or relu (the reference tutorial)
    init_state: str = "tanh"  # h0, c0 = tanh(Linear(mean region)) or "linear" (no tanh, the reference tutorial)
    gate: bool = True  # sigmoid gate on the attention context ("beta", Show, Attend and Tell 4.2.1)


# The value a key added after a checkpoint was written takes when that checkpoint is loaded: the behaviour
# it was trained with, whatever today's default is.
LEGACY_DEFAULTS = {"model": {"features": "project", "attention": "tanh", "init_state": "tanh", "gate": True}}


DATASET_FORMATS = ("auto", "synthetic", "coco", "karpathy", "flickr8k", "flickr30k", "csv", "jsonl")


@dataclass
class DatasetConfig:
    format: str = "auto"  # auto (from the annotations file; synthetic without one) or one of DATASET_FORMATS
    root: str = "data/synthetic"  # synthetic: generated here on first use; others: base for relative paths
    annotations: str = ""  # the captions file: COCO JSON, Karpathy dataset_*.json, Flickr8k.token.txt, CSV, JSONL
    encoding: str = ""  # the captions files' text encoding: "" reads UTF-8 (with or without BOM), else e.g. latin-1
    images: str = ""  # image folder (Karpathy COCO: the one holding train2014/, val2014/); empty: annotations' folder
    splits: str = ""  # optional JSON {"train": [image ids], "val": [...], "test": [...]}; overrides the file's own
    train_list: str = ""  # optional image-name lists, one per line (Flickr_8k.trainImages.txt); Flickr8k's three
    val_list: str = ""  # lists are found next to the token file without these; images in no list are unused
    test_list: str = ""
    restval: str = "train"  # Karpathy 'restval' images: train (Karpathy's recipe, 113k train images) or drop
    max_missing_fraction: float = 0.05  # missing image files are skipped with a warning; more than this is an error
    val_fraction: float = 0.1  # data without splits: share of images held out for val, and again for test
    min_freq: int = 1  # words seen fewer times in the training captions become <unk>
    max_len: int = 30  # captions are cut to this many words
    synthetic_images: int = 2000  # synthetic only: how many images to generate
    synthetic_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    seed: int = 0
    num_workers: int = 2
    log_every: int = 50  # steps between metrics.jsonl lines
    precompute_features: bool = True  # run the frozen encoder once per image instead of once per caption per epoch
    val_images: int = 0  # cap on validation images per epoch (0 = all)
    checkpoint_every: int = 500  # steps between last.pt saves (0: only at the end of each epoch)
    max_bad_steps: int = 5  # a non-finite loss skips its step; this many in a row stop the run
    lr_schedule: str = "none"  # none | cosine | step | plateau (after warmup_steps of linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: the final lr as a fraction of the initial one
    lr_decay_epochs: int = 1  # step: the lr is multiplied by lr_gamma every this many epochs
    lr_gamma: float = 0.1  # step and plateau: the factor of each decay
    lr_patience: int = 2  # plateau: validations without improvement before the lr decays
    select_metric: str = "cider"  # validation score (coco-caption's, as evaluate's) that picks best.pt, drives plateau
    # and early stopping: cider (CIDEr-D), bleu1..bleu4 or rouge_l
    early_stop_patience: int = 0  # stop after this many validations without improvement (0: never)
    encoder_lr: float = 1e-4  # learning rate of the fine-tuned encoder stages (encoder.finetune_from)
    objective: str = "xe"  # xe: cross-entropy on the reference captions; scst: self-critical training on CIDEr-D
    scst_samples: int = 5  # scst: captions sampled per image (train.batch_size counts images)
    scst_baseline: str = "mean"  # scst: mean (of the image's other samples; Luo 2020) or greedy (Rennie et al.)
    scst_entropy: float = 0.0  # scst: weight of an entropy bonus that keeps sampling from collapsing (0: off)


@dataclass
class DecodeConfig:
    beam_size: int = 3
    max_len: int = 30  # longest caption produced, in words
    length_penalty: float = 0.0  # 0 ranks beams by total log-probability; 1 by mean per word
    batch_size: int = 32
    sample: bool = False  # draw each word from the model's distribution (varied captions) instead of greedy/beam
    temperature: float = 1.0  # sampling only: < 1 sharper (closer to greedy), > 1 more varied


@dataclass
class CacheConfig:
    dir: str = ""  # feature cache folder written by `captioner extract`; "" = DATASET_ROOT/features/ARCH-LAYER-SIZE
    dtype: str = "bfloat16"  # bfloat16 | float32; never float16: random-weight activations (~1e8) overflow it
    use: bool = True  # train and evaluate read features from the cache when it is valid and covers the split


# auto | true | false; YAML and overrides may also give a boolean (true/false, yes/no, on/off).
Switch = typing.Literal["auto", "true", "false"]


@dataclass
class ComputeConfig:
    # auto: on CUDA, and on CPUs with native bf16 units (AVX-512 BF16, AMX); see engine/runtime/compute.py
    bf16: Switch = "auto"  # bf16 autocast; weights, optimizer state, loss and checkpoints stay float32
    channels_last: Switch = "auto"  # the CNN in channels_last (NHWC) memory format
    compile: bool = False  # torch.compile the encoder: a slow first batch, then faster; for long runs
    gpu_decode: bool = False  # CUDA only: workers read JPEG bytes, the GPU decodes and resizes them in batches
    num_workers: int = 2  # image decoding processes of evaluate, extract and training's feature extraction
    encode_batch_size: int = 32  # images per encoder batch when features are extracted (extract, precompute)


@dataclass
class Config:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)


LR_SCHEDULES = ("none", "cosine", "step", "plateau")
# What validation computes (coco-caption's scorers, as in evaluate; METEOR's java process is too slow per epoch).
SELECT_METRICS = ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l")
OBJECTIVES = ("xe", "scst")
SCST_BASELINES = ("mean", "greedy")


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
    target = next((a for a in args if a is not type(None)), hint) if args else hint
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


def _set(cfg: Config, key: str, value) -> None:
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in {f.name for f in dataclasses.fields(cfg)} else None
    if section is None or name not in {f.name for f in dataclasses.fields(section)}:
        raise _unknown_key(key, cfg)
    annotation = typing.get_type_hints(type(section))[name]
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
    package = Path(__file__).resolve().parent
    for folder in (package / "configs", package.parent / "configs"):
        if (folder / name).is_file():
            return folder / name
    return None


def require_min(*checks: tuple[str, int | float | None, int | float]) -> None:
    """The range checks every command makes on its options: ("--beam", 0, 1) -> "--beam must be >= 1, got 0".
    None means "not given" and passes."""
    for name, value, low in checks:
        if value is not None and value < low:
            raise CaptionerError(f"{name} must be >= {low}, got {value}")


# What a trained checkpoint's config can still change: where the data is, how to decode, how to compute.
CHECKPOINT_SECTIONS = ("dataset", "decode", "compute", "cache")


def check_checkpoint_overrides(overrides: list[str]) -> None:
    """Refuse overrides that cannot apply to a trained checkpoint (its encoder, model shape and training)."""
    fixed = [o for o in overrides if o.partition("=")[0].strip().partition(".")[0] not in CHECKPOINT_SECTIONS]
    if fixed:
        raise CaptionerError(f"{', '.join(fixed)}: a trained checkpoint's encoder, model and training settings are "
                             f"fixed; only {', '.join(s + '.*' for s in CHECKPOINT_SECTIONS)} overrides apply here")


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


def _known_encoding(name: str) -> bool:
    try:
        return not name or codecs.lookup(name).name not in ("base64", "hex", "zlib", "bz2", "rot-13", "quopri", "uu")
    except LookupError:
        return False


def validate(cfg: Config) -> None:
    """Reject values that would only fail later, deep inside a run."""
    checks = [
        (cfg.encoder.in_channels >= 1, "encoder.in_channels must be >= 1"),
        (cfg.encoder.image_size >= 32, "encoder.image_size must be >= 32"),
        (cfg.model.embed_dim > 0 and cfg.model.attention_dim > 0 and cfg.model.decoder_dim > 0,
         "model sizes must be positive"),
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
         f"dataset.encoding {cfg.dataset.encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)"),
        (0.0 <= cfg.dataset.max_missing_fraction <= 1.0, "dataset.max_missing_fraction must be in [0, 1]"),
        (0.0 <= cfg.dataset.val_fraction < 0.5, "dataset.val_fraction must be in [0, 0.5)"),
        (cfg.dataset.min_freq >= 1, "dataset.min_freq must be >= 1"),
        (cfg.dataset.max_len >= 1, "dataset.max_len must be >= 1"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.lr > 0, f"train.lr must be > 0, got {cfg.train.lr}"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.train.num_workers >= 0, "train.num_workers must be >= 0"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0: only at epoch ends)"),
        (cfg.train.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (cfg.train.lr_schedule in LR_SCHEDULES,
         f"train.lr_schedule must be one of: {', '.join(LR_SCHEDULES)}, got '{cfg.train.lr_schedule}'"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0.0 <= cfg.train.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (cfg.train.lr_decay_epochs >= 1, "train.lr_decay_epochs must be >= 1"),
        (0.0 < cfg.train.lr_gamma <= 1.0, "train.lr_gamma must be in (0, 1]"),
        (cfg.train.lr_patience >= 0, "train.lr_patience must be >= 0"),
        (cfg.train.select_metric in SELECT_METRICS,
         f"train.select_metric must be one of: {', '.join(SELECT_METRICS)}, got '{cfg.train.select_metric}'"),
        (cfg.train.early_stop_patience >= 0, "train.early_stop_patience must be >= 0 (0: never stop early)"),
        (cfg.train.encoder_lr > 0, f"train.encoder_lr must be > 0, got {cfg.train.encoder_lr}"),
        (cfg.train.objective in OBJECTIVES,
         f"train.objective must be one of: {', '.join(OBJECTIVES)}, got '{cfg.train.objective}'"),
        (cfg.train.scst_baseline in SCST_BASELINES,
         f"train.scst_baseline must be one of: {', '.join(SCST_BASELINES)}, got '{cfg.train.scst_baseline}'"),
        (cfg.train.scst_samples >= (2 if cfg.train.scst_baseline == "mean" else 1),
         f"train.scst_samples must be >= 2 with the mean baseline (>= 1 with greedy), got {cfg.train.scst_samples}"),
        (cfg.train.scst_entropy >= 0, "train.scst_entropy must be >= 0"),
        (cfg.decode.beam_size >= 1, f"decode.beam_size must be >= 1, got {cfg.decode.beam_size}"),
        (cfg.decode.max_len >= 1, "decode.max_len must be >= 1"),
        (cfg.decode.batch_size >= 1, "decode.batch_size must be >= 1"),
        (cfg.compute.num_workers >= 0, f"compute.num_workers must be >= 0, got {cfg.compute.num_workers}"),
        (cfg.compute.encode_batch_size >= 1,
         f"compute.encode_batch_size must be >= 1, got {cfg.compute.encode_batch_size}"),
        (cfg.decode.temperature > 0, f"decode.temperature must be > 0, got {cfg.decode.temperature}"),
        (cfg.cache.dtype in ("bfloat16", "float32"),
         f"cache.dtype must be bfloat16 or float32 (float16 overflows random-weight features), not {cfg.cache.dtype}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CaptionerError(message)
