"""Checkpoints as plain data: state_dicts, the config as a dict, the vocabulary as a list of words.

Written to a temporary file, fsynced, then renamed (and the folder fsynced, so the rename itself survives a
power cut): a crash while saving never leaves a truncated file. Loaded with weights_only=True: loading a
checkpoint can never run code.

    save_checkpoint("runs/x/best.pt", {"model": model.state_dict(), ...})
    model, vocab, cfg = load_model("runs/x/best.pt", device="cpu")
"""
from __future__ import annotations

from pathlib import Path

import torch

from captioner import files
from captioner.config import ComputeConfig, Config, from_saved_dict
from captioner.files import atomic_write
from captioner.model.backbone_weights import strip_wrapper_prefixes
from captioner.engine.infer.integrity import WeightSource, check_vocab, check_weights, vocab_sha256
from captioner.errors import CaptionerError, os_failure
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    if isinstance(state.get("vocab"), list):  # the words in order, checked on load (integrity.check_vocab)
        state = {**state, "vocab_sha256": vocab_sha256(state["vocab"])}
    with atomic_write(path, "checkpoint") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporary files of saves that a kill interrupted (the checkpoints themselves are whole)."""
    return files.remove_stale_temporaries(folder, "*.pt.*")


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint's dict (tensors on CPU); mmap=True maps tensors lazily (cheap when only the config is read)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as e:  # permission denied, an I/O error: the file may be fine, reading it is not
        raise os_failure(f"cannot read checkpoint {path}", e) from None
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign files all get one line
        raise CaptionerError(f"checkpoint {path} {_unreadable_because(path, e)}") from None
    missing = [k for k in ("model", "config", "vocab") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CaptionerError(f"checkpoint {path} lacks {', '.join(missing)}: not a captioner checkpoint")
    _check_types(state, path, {"model": "a state_dict (names -> tensors)", "config": "a mapping of config sections",
                               "vocab": "a list of words"})
    state["model"] = strip_wrapper_prefixes(state["model"])
    return state


def _unreadable_because(path: Path, error: Exception) -> str:
    """Why torch.load refused path, in words: its own message is long, cut mid-sentence, and for a pickled model
    suggests weights_only=False, which would run the file's code."""
    import zipfile
    if type(error).__name__ == "UnpicklingError" and "weights_only" in str(error).lower():
        return ("holds Python objects, not only tensors and plain data (a pickled model?); it is not loaded, "
                "as loading it could run code: save a state_dict checkpoint (captioner train writes them)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        return "is truncated or corrupt (its zip archive is incomplete): copy or download it again"
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return "is not a PyTorch checkpoint (neither a zip archive nor a pickle): is it the right file?"
    return f"is truncated, corrupt or not a captioner checkpoint ({type(error).__name__})"


def _well_typed(key: str, value) -> bool:
    """Whether a checkpoint field has the type save_checkpoint gives it (a hand-edited file may not)."""
    if key == "model":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in value.items())
    if key == "vocab":
        return isinstance(value, list) and all(isinstance(w, str) for w in value)
    if key in ("config", "optimizer", "schedule", "progress"):
        return isinstance(value, dict)
    if key == "scaler":
        return value is None or isinstance(value, dict)
    if key == "rng":
        return isinstance(value, list) and len(value) > 0 and all(isinstance(r, dict) for r in value)
    if key == "metrics_offset":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return True


def _check_types(state: dict, path, expected: dict) -> None:
    for key, what in expected.items():
        if key in state and not _well_typed(key, state[key]):
            raise CaptionerError(f"checkpoint {path}: field '{key}' is {type(state[key]).__name__}, expected {what} "
                                 f"(edited by hand?); use a checkpoint written by `captioner train`")


TRAINING_STATE = ("optimizer", "schedule", "scaler", "progress", "rng")


def check_resumable(state: dict, path: str | Path) -> None:
    """A checkpoint to resume from must hold the whole training state, not only the weights."""
    missing = [k for k in TRAINING_STATE if k not in state]
    if missing:
        raise CaptionerError(f"checkpoint {path} lacks the training state to resume from ({', '.join(missing)}); "
                             f"its weights still work with `captioner evaluate` and `captioner caption`")
    _check_types(state, path, {"optimizer": "an optimizer state_dict", "schedule": "a schedule state_dict",
                               "scaler": "a scaler state_dict or None", "progress": "a mapping of counters",
                               "rng": "a list of random generator states", "metrics_offset": "a byte count"})


def model_from_checkpoint(state: dict, path: str | Path = "checkpoint", where: WeightSource | None = None
                          ) -> tuple[CaptionModel, Vocabulary, Config]:
    """Rebuild the model from the checkpoint's own config (never guessed from weight shapes), after its weights
    and vocabulary proved themselves (integrity.py); where names the files in errors (a model folder's)."""
    where = where or WeightSource(f"checkpoint {path}", "its config")
    try:
        cfg = from_saved_dict(state["config"])
    except CaptionerError as e:
        raise CaptionerError(f"checkpoint {path} has an invalid config: {e}") from None
    # compute.* describes the machine that trained (a GPU's bf16: true), not the model: run with this one's auto.
    cfg.compute = ComputeConfig()
    vocab = Vocabulary(state["vocab"])
    check_vocab(vocab.tokens, state.get("vocab_sha256"), f"checkpoint {path}'s vocab", f"checkpoint {path}")
    # The backbone's weights come from the checkpoint itself: do not load or download them again.
    cfg_no_weights = from_saved_dict(state["config"])
    cfg_no_weights.encoder.weights = None
    model = CaptionModel(cfg_no_weights.encoder, cfg.model, len(vocab))
    weights, template = state["model"], model.state_dict()
    # A model folder leaves out the backbone modules after the hooked layer (never computed): zeros, as
    # encoder.weights files that lack them load (model/encoder.py).
    never_computed = {f"encoder.{k}" for k in model.encoder.uncomputed_keys()} - set(weights)
    # (in the file's recorded dtype, so that the zeros pass its dtype check)
    zeros = {k: torch.zeros_like(template[k], dtype=where.dtype if template[k].is_floating_point() and where.dtype
                                 else template[k].dtype) for k in never_computed}
    weights = {**zeros, **weights}
    check_weights(weights, template, where)  # before load_state_dict, which would cast and copy NaN silently
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CaptionerError(f"{where.weights} does not match {where.config}: {' '.join(lines[1:3])[:300]}") from None
    return model, vocab, cfg


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CaptionModel, Vocabulary, Config]:
    """The model (in eval mode, on device), its vocabulary and its config, from one checkpoint file."""
    model, vocab, cfg = model_from_checkpoint(load_checkpoint(path), path)
    return model.to(device).eval(), vocab, cfg
