"""The model's id, as outputs record the model that made them (caption's "model" field, the resume check).

    model_id(model, vocab, cfg)          # 16 hex digits over the tensors, the vocabulary and the config
    graphs_id(folder, vocab, cfg)        # the same for the ONNX graphs of a model folder (--runtime onnxruntime)

Computed from what makes the captions, never from the container's bytes: a checkpoint exported twice, or
re-exported from its model folder, keeps its id, and so does the float32 model folder of a checkpoint (the same
tensors): a resumed `caption` accepts its own output. Another dtype (bf16), another vocabulary order or another
architecture changes it. Decoding settings are recorded beside it ("decoding"), so they are left out here.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from captioner.config import Config, to_dict
from captioner.files import update_digest
from captioner.text import Vocabulary

DIGITS = 16
# config keys that do not change a caption once the weights exist (where the weights came from, how they trained)
_NOT_THE_MODEL = {"encoder": {"weights", "finetune_from", "seed"}}


def _described(vocab: Vocabulary, cfg: Config) -> bytes:
    """The vocabulary in order and the config sections that build the model (encoder, model), as canonical JSON."""
    config = to_dict(cfg)
    sections = {name: {k: v for k, v in config[name].items() if k not in _NOT_THE_MODEL.get(name, ())}
                for name in ("encoder", "model")}
    return json.dumps({"vocab": vocab.tokens, "config": sections}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode()


def tensors_digest(state: dict[str, torch.Tensor], digest=None):
    """SHA-256 over each tensor's name, dtype, shape and bytes (C order), in sorted name order."""
    digest = digest or hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes, read in place
    return digest


def model_id(model, vocab: Vocabulary, cfg: Config) -> str:
    """16 hex digits identifying a CaptionModel's computed weights, its vocabulary and its config. The backbone
    modules after the hooked layer (never computed; a model folder leaves them out) are left out."""
    skip = {f"encoder.{k}" for k in model.encoder.uncomputed_keys()}
    state = {name: t for name, t in model.state_dict().items() if name not in skip}
    digest = tensors_digest(state)
    digest.update(_described(vocab, cfg))
    return digest.hexdigest()[:DIGITS]


def graphs_id(graphs: list[Path], precision: str, vocab: Vocabulary, cfg: Config) -> str:
    """16 hex digits identifying ONNX graphs (their files: the export is deterministic), their precision, the
    vocabulary and the config; another runtime than PyTorch's, so never equal to model_id."""
    digest = hashlib.sha256(f"onnxruntime {precision}".encode())
    for path in graphs:
        update_digest(digest, path, "ONNX graph")
    digest.update(_described(vocab, cfg))
    return digest.hexdigest()[:DIGITS]
