"""Model folders: what `captioner export` writes and every command loads (`--checkpoint model/`).

    model/config.json        {"format": "captioner-model", "format_version": 1, "files": {role: file}, "config": {...},
                              "vocab_size", "dtype", "preprocessing", "source", ...}
    model/model.safetensors  every weight the model computes with, backbone included (float32 or bfloat16)
    model/vocab.json         the vocabulary, as the run folder's vocab.json: {"tokens": [...]}
    model/README.md          the model card (engine/infer/model_card.py)

    meta = write_model_folder("model/", model, vocab, cfg, dtype="bf16", card=text)
    model, vocab, cfg = load_model_folder("model/", device="cpu")     # torch.load is never called
    model, vocab, cfg = load_model_source(resolve_model(name), device)  # a .pt checkpoint, a folder or a Hub id

config.json is plain JSON that other tools can read; `files` maps each role to its file name so that other
formats add theirs to the same folder (issue 22's ONNX files: extra_files). Weights of the backbone modules
after the hooked layer (a ResNet's fc) are never computed, so they are left out and loaded as zeros.
A folder of a newer format is refused in one line (upgrade captioner), one older than OLDEST_READABLE too
(export it again from its checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from captioner import __version__
from captioner.config import Config, to_dict
from captioner.engine.infer import hub
from captioner.engine.infer.checkpoint import load_model, model_from_checkpoint
from captioner.engine.infer.folder_config import check_folder_config, check_model_preprocessing
from captioner.engine.infer.integrity import WeightSource, check_vocab, vocab_sha256
from captioner.errors import CaptionerError, os_failure
from captioner.files import atomic_folder, update_digest, write_json, write_text
from captioner.model.backbones import SOURCES, parse_arch
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary
from captioner.weights import read_state_dict, write_safetensors

FORMAT = "captioner-model"
FORMAT_VERSION = 1  # what this captioner writes
OLDEST_READABLE = 1  # the oldest format_version this captioner still reads
CONFIG_FILE = "config.json"
FILES = {"weights": "model.safetensors", "vocab": "vocab.json", "card": "README.md"}  # role -> file name
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}  # --dtype -> the weights' storage type
DTYPE_NAMES = {"float32": "float32", "bf16": "bfloat16"}  # as config.json and safetensors name them


def is_model_folder(path: str | Path) -> bool:
    """Whether path is a folder (then it must be a model folder; a checkpoint is a file)."""
    return Path(path).is_dir()


def resolve_model(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint file or model folder for name: name itself when it exists here, else a Hugging Face
    Hub repo id ("owner/model") downloaded through the Hub's cache (the [hub] extra). Anything else is returned
    as a path, for the loader to say what is wrong with it."""
    path = Path(name).expanduser()
    if path.exists() or not hub.looks_like_repo_id(str(name)):
        return path
    return hub.download(str(name), revision)


def load_model_source(path: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[CaptionModel, Vocabulary, Config]:
    """(model in eval mode on device, vocabulary, config) from a checkpoint file or a model folder."""
    return load_model_folder(path, device) if is_model_folder(path) else load_model(path, device)


def model_hash(path: str | Path, digits: int = 16) -> str:
    """The first digits hex digits of SHA-256 over a checkpoint file's bytes, or a folder's config.json and the files
    it lists (the model card left out): export's provenance of the checkpoint, and the model id of outputs written
    before it was computed from the tensors (model_id.py; Predictor.legacy_model_hash)."""
    path = Path(path)
    if not is_model_folder(path):
        files = [path]
    else:
        meta = read_folder_config(path)
        files = [path / CONFIG_FILE] + [path / f for role, f in sorted(meta["files"].items()) if role != "card"]
    digest = hashlib.sha256()
    for file in files:
        update_digest(digest, file, "model file" if file != path else "checkpoint")
    return digest.hexdigest()[:digits]


def read_folder_config(folder: str | Path) -> dict:
    """config.json of a model folder, checked: format, format version, the files it names, the config."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        run = next((folder / name for name in ("best.pt", "last.pt") if (folder / name).is_file()), None)
        hint = f"a run folder? give its checkpoint, {run}" if run else "give a checkpoint .pt file, or export one"
        raise CaptionerError(f"{folder} is a folder without {CONFIG_FILE}: not a model folder written by "
                             f"`captioner export` ({hint})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise os_failure(f"{path}: cannot read", e) from None
    except UnicodeDecodeError as e:
        raise CaptionerError(f"{path} is not UTF-8 JSON (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CaptionerError(f"{path} is not a captioner model folder config (format {found!r}, expected "
                             f"'{FORMAT}'); export one with `captioner export --checkpoint best.pt --out DIR`")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CaptionerError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CaptionerError(f"model folder {folder} has format_version {version}, newer than this captioner "
                             f"{__version__} reads ({FORMAT_VERSION}): pip install -U captioner")
    if version < OLDEST_READABLE:
        raise CaptionerError(f"model folder {folder} has format_version {version}, older than this captioner "
                             f"{__version__} reads ({OLDEST_READABLE}..{FORMAT_VERSION}): export it again from "
                             f"its checkpoint with `captioner export`")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CaptionerError(f"{path}: 'files' must map roles to file names, got {files!r}")
    # A deployment folder (`export --format onnx --onnx-only`) holds the ONNX graphs instead of the weights.
    required = ("vocab",) if "onnx" in files and "weights" not in files else ("weights", "vocab")
    for role in required:
        if role not in files:
            raise CaptionerError(f"{path}: 'files' names no {role} file")
        if Path(files[role]).name != files[role]:  # a name inside the folder, never a path elsewhere
            raise CaptionerError(f"{path}: the {role} file {files[role]!r} must be a file name in the folder")
        if not (folder / files[role]).is_file():
            raise CaptionerError(f"model folder {folder} lacks {files[role]} (its {role}); copy the whole folder")
    if not isinstance(meta.get("config"), dict):
        raise CaptionerError(f"{path}: 'config' must be a mapping of config sections")
    # what the loaders check the files against (integrity.py); every format-1 folder has them
    if meta.get("dtype") not in DTYPE_NAMES.values():
        raise CaptionerError(f"{path}: key 'dtype' must be one of {', '.join(DTYPE_NAMES.values())}, got "
                             f"{meta.get('dtype', 'nothing (missing)')!r}")
    size = meta.get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise CaptionerError(f"{path}: key 'vocab_size' must be the vocabulary's word count (an integer >= 1), got "
                             f"{size if 'vocab_size' in meta else 'nothing (missing)'!r}")
    # export writes the config in full: a missing key is refused, never filled by today's default
    check_folder_config(meta, path)
    return meta


def read_folder_vocab(folder: str | Path, meta: dict) -> Vocabulary:
    """The folder's vocabulary, proved to be the one the model was exported with: its size against config.json's
    vocab_size, its words in order against vocab_sha256 (folders exported before the hash: the size only)."""
    folder = Path(folder)
    vocab = Vocabulary.load(folder / meta["files"]["vocab"])
    if meta["vocab_size"] != len(vocab):
        raise CaptionerError(f"model folder {folder}: {meta['files']['vocab']} holds {len(vocab)} tokens but "
                             f"{CONFIG_FILE} says vocab_size {meta['vocab_size']}: the files come from two exports")
    check_vocab(vocab.tokens, meta.get("vocab_sha256"), folder / meta["files"]["vocab"], folder / CONFIG_FILE)
    return vocab


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[CaptionModel, Vocabulary, Config]:
    """The model (eval mode, on device), its vocabulary and config from a model folder; never runs torch.load.

    bfloat16 weights load into the float32 model (the compute section decides the precision it runs in)."""
    folder = Path(folder)
    meta = read_folder_config(folder)
    if "weights" not in meta["files"]:
        raise CaptionerError(f"model folder {folder} holds ONNX graphs only, no PyTorch weights (exported with "
                             f"--onnx-only): run it with --runtime onnxruntime (Python: runtime=\"onnxruntime\")")
    weights_file = folder / meta["files"]["weights"]
    weights = read_state_dict(weights_file, "model weights file")
    vocab = read_folder_vocab(folder, meta)
    state = {"model": weights, "config": meta["config"], "vocab": vocab.tokens}
    dtype = {name: DTYPES[key] for key, name in DTYPE_NAMES.items()}[meta["dtype"]]
    model, vocab, cfg = model_from_checkpoint(state, folder, WeightSource(str(weights_file),
                                                                          str(folder / CONFIG_FILE), dtype))
    check_model_preprocessing(meta, model.encoder, folder / CONFIG_FILE)
    return model.to(device).eval(), vocab, cfg


def exported_state(model: CaptionModel, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The weights a model folder holds: the model's state_dict without the never-computed backbone modules,
    floating-point tensors cast to dtype (integer buffers such as BatchNorm's step count stay as they are)."""
    if dtype not in DTYPES:
        raise CaptionerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    skip = {f"encoder.{k}" for k in model.encoder.uncomputed_keys()}
    return {name: t.to(DTYPES[dtype]) if t.is_floating_point() else t
            for name, t in model.state_dict().items() if name not in skip}


def backbone_library(arch: str) -> str:
    """The library a backbone comes from: torchvision, timm or open_clip."""
    source = parse_arch(arch)[0]
    return next(name for name, s in SOURCES.items() if s is source)


def folder_config(model: CaptionModel, vocab: Vocabulary, cfg: Config, dtype: str, files: dict[str, str],
                  source: dict | None = None) -> dict:
    """config.json's content: the format, the files, the config (this machine's compute section left out, its
    paths cut to names: shareable_config), and what other tools need to run the model without captioner's code
    (preprocessing, sizes)."""
    enc = model.encoder
    config = shareable_config({k: v for k, v in to_dict(cfg).items() if k != "compute"})
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "library_name": "captioner",
            "captioner_version": __version__, "files": dict(files), "dtype": DTYPE_NAMES[dtype],
            "vocab_size": len(vocab), "vocab_sha256": vocab_sha256(vocab.tokens),
            "architecture": {"library": backbone_library(enc.arch), "encoder": enc.arch,
                             "layer": enc.layer, "channels": enc.channels,
                             "grid": list(enc.grid), "decoder": "soft-attention LSTM (Show, Attend and Tell)",
                             "parameters": sum(p.numel() for p in model.parameters())},
            "preprocessing": {"image_size": enc.image_size, "interpolation": enc.interpolation,
                              "resize": f"{enc.interpolation}, to image_size x image_size (squashed, not cropped)",
                              "exif_orientation": True, "alpha": "composited onto white",
                              "mean": list(enc.preprocess.mean), "std": list(enc.preprocess.std),
                              "input": "RGB uint8 / 255"},
            "decode": config["decode"], "source": source or {}, "config": config}


# Config keys that name places on the training machine: a model folder keeps only their last component (a name
# that still says which dataset, cache or weights file), since loading never reads them and a folder passed on
# must not carry its maker's home folder. Any other absolute path string is cut to its name too.
MACHINE_PATHS = {"dataset": ("root", "annotations", "images", "splits", "train_list", "val_list", "test_list"),
                 "cache": ("dir",), "encoder": ("weights",)}


def _name_only(value):
    return os.path.basename(os.path.normpath(value)) if isinstance(value, str) and value else value


def shareable_config(config: dict) -> dict:
    """A copy of a config dict for a folder that leaves this machine: paths cut to their names."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return _name_only(value) if isinstance(value, str) and os.path.isabs(value) else value
    config = strip(config)
    for section, keys in MACHINE_PATHS.items():
        for key in keys:
            if isinstance(config.get(section), dict) and key in config[section]:
                config[section][key] = _name_only(config[section][key])
    return config


# extra_files: writers that add other formats' files to the folder (folder, model, dtype) -> {role: file name},
# or ({role: file name}, {config.json key: what it says of those files}) to describe them in config.json too.
ExtraWriter = Callable[[Path, CaptionModel, str], "dict | tuple[dict, dict]"]


def write_model_folder(out: str | Path, model: CaptionModel, vocab: Vocabulary, cfg: Config, *,
                       dtype: str = "float32", card: Callable[[dict], str] | None = None, source: dict | None = None,
                       extra_files: tuple[ExtraWriter, ...] = (), overwrite: bool = False,
                       weights: bool = True) -> dict:
    """Write the model folder at out, all files at once (files.atomic_folder); returns config.json's content.

    card(meta) gives the README.md text; extra_files add other formats' files (their roles go into `files`).
    overwrite replaces an existing model folder (never another non-empty folder). weights=False leaves
    model.safetensors out (a deployment folder of ONNX graphs: extra_files must then write them)."""
    out = Path(out)
    if overwrite and out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise CaptionerError(f"--out {out} is a non-empty folder that is not a model folder: not replaced")
    with atomic_folder(out, "model folder", replace=overwrite) as tmp:
        files, described = dict(FILES), {}
        if weights:
            write_safetensors(tmp / files["weights"], exported_state(model, dtype),
                              {"format": "pt", "captioner_format_version": str(FORMAT_VERSION)}, "model weights file")
        else:
            files.pop("weights")
        vocab.save(tmp / files["vocab"])
        for writer in extra_files:
            written = writer(tmp, model, dtype)
            written, said = written if isinstance(written, tuple) else (written, {})
            files.update(written)
            described.update(said)
        if card is None:
            files.pop("card")
        meta = {**folder_config(model, vocab, cfg, dtype, files, source), **described}
        write_json(tmp / CONFIG_FILE, meta, "model config")
        if card is not None:
            write_text(tmp / files["card"], card(meta), "model card")
    return meta
