"""A loaded model proves itself before its first caption: the checks every loader runs (checkpoint.py,
model_folder.py, onnx_runtime.py; a Hub model is a model folder), each refusal one line naming the file.

    check_weights(weights, model.state_dict(), where)        # names, shapes, dtypes, every value finite
    check_vocab(tokens, recorded_sha256, vocab_file)         # the words, in order, that the model was saved with
    check_manifest(manifest, Path("model/onnx.json"))        # onnx.json: exactly its keys, each of its type
    check_graphs(shapes, manifest["encoder"], 40, folder)    # the ONNX graphs' sizes against each other and the vocab

Without them a model folder whose weights hold NaN captions every image alike with "score": NaN, an integer
tensor is cast to float without a word, and a vocab.json of the same length in another order gives wrong words.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.errors import CaptionerError


def vocab_sha256(tokens: list[str]) -> str:
    """SHA-256 of the words in order (as compact JSON: no separator a word could hold), recorded at save time."""
    return hashlib.sha256(json.dumps(list(tokens), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def check_vocab(tokens: list[str], recorded: str | None, vocab_file: str | Path, recorded_in: str | Path) -> None:
    """The vocabulary's hash equals the one recorded_in holds; files saved before the hash (recorded None) pass."""
    if recorded is None:
        return
    if not isinstance(recorded, str):
        raise CaptionerError(f"{recorded_in}: 'vocab_sha256' must be a hex string, got {recorded!r}")
    if vocab_sha256(tokens) != recorded:
        raise CaptionerError(f"{vocab_file} is not the vocabulary the model was saved with: its {len(tokens)} words "
                             f"differ (in order or content) from those {recorded_in} records (vocab_sha256 "
                             f"{recorded[:12]}...); copy the model's files from one export")


@dataclass(frozen=True)
class WeightSource:
    """How errors name a model's files: the weights file, the config that gives the shapes, and the dtype the
    format records for floating-point tensors (None: any floating type, as a checkpoint saves the training's)."""
    weights: str
    config: str
    dtype: torch.dtype | None = None


def check_weights(weights: dict[str, torch.Tensor], template: dict[str, torch.Tensor], where: WeightSource) -> None:
    """weights (the file's, never-computed modules filled in) against template (the state_dict of the model that
    the config builds): the same names, the template's shapes, floating where it is floating (of where.dtype),
    integer where it is integer, and every value finite."""
    missing, unexpected = sorted(set(template) - set(weights)), sorted(set(weights) - set(template))
    if missing or unexpected:
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
        raise CaptionerError(f"{where.weights} does not match {where.config}: tensors {'; '.join(parts)}")
    for name in sorted(template):
        tensor, expected = weights[name], template[name]
        _check_dtype(name, tensor, expected, where)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise CaptionerError(f"{where.weights}: tensor {name} has shape {tuple(tensor.shape)}, {where.config} "
                                 f"makes it {tuple(expected.shape)}")
        # the sum is NaN or inf whenever a value is (and a tenth of isfinite's time on a big tensor); the exact
        # check runs only then, for finite values that overflow the sum
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = tensor[~finite]
                kind = "NaN" if bool(bad.isnan().any()) else "inf"
                raise CaptionerError(f"{where.weights}: tensor {name} holds {kind} ({bad.numel()} of "
                                     f"{tensor.numel()} values not finite): the weights are corrupt; export or "
                                     f"train the model again")


def _check_dtype(name: str, tensor: torch.Tensor, expected: torch.Tensor, where: WeightSource) -> None:
    if expected.is_floating_point():
        wanted = where.dtype
        ok = tensor.dtype == wanted if wanted is not None else tensor.is_floating_point()
        what = str(wanted).removeprefix("torch.") if wanted is not None else "a floating-point type"
        recorded = f" (the dtype {where.config} records)" if wanted is not None else ""
    else:
        ok, what, recorded = tensor.dtype == expected.dtype, str(expected.dtype).removeprefix("torch."), ""
    if not ok:  # never cast: an integer tensor where weights belong was truncated or is another file
        raise CaptionerError(f"{where.weights}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, "
                             f"expected {what}{recorded}; export the model again")


# ---------------------------------------------------------------- ONNX

_INT, _STR, _LIST, _DICT = "an integer", "a string", "a list", "a mapping"
# onnx.json as onnx_export.write_onnx_files writes it: key -> (what it must be, required)
MANIFEST_KEYS = {"format_version": (_INT, True), "opset": (_INT, True), "precision": (_STR, True),
                 "graphs": (_DICT, True), "encoder": (_DICT, True), "vocab_size": (_INT, True),
                 "interface": (_DICT, False), "quantization": ("a mapping or null", False),
                 "exporter": (_DICT, False), "axes": (_DICT, False)}  # folders exported before they were stated
ENCODER_KEYS = {"arch": (_STR, True), "layer": (_STR, True), "image_size": (_INT, True),
                "in_channels": (_INT, True), "channels": (_INT, True), "grid": ("a list of two integers", True),
                "preprocess": (_DICT, False)}  # folders exported before preprocessing travelled lack it
PREPROCESS_KEYS = {"mean": ("a list of numbers", True), "std": ("a list of numbers", True),
                   "interpolation": (_STR, True)}


def _is(value, what: str) -> bool:
    if what == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if what == _STR:
        return isinstance(value, str)
    if what == _DICT:
        return isinstance(value, dict)
    if what == "a mapping or null":
        return value is None or isinstance(value, dict)
    if what == "a list of two integers":
        return isinstance(value, list) and len(value) == 2 and all(_is(v, _INT) and v > 0 for v in value)
    if what == "a list of numbers":
        return isinstance(value, list) and bool(value) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    raise ValueError(what)


def _check_keys(data, schema: dict, path: Path, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise CaptionerError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a JSON object")
    for key in data:
        if key not in schema:
            raise CaptionerError(f"{path}: unknown key '{prefix}{key}' (valid: {', '.join(schema)}); export the "
                                 f"model again")
    for key, (what, required) in schema.items():
        if key not in data:
            if required:
                raise CaptionerError(f"{path}: key '{prefix}{key}' is missing; export the model again")
        elif not _is(data[key], what):
            raise CaptionerError(f"{path}: key '{prefix}{key}' must be {what}, got {json.dumps(data[key])[:60]}; "
                                 f"export the model again")


def check_manifest(manifest, path: Path, precisions: tuple[str, ...], graphs: tuple[str, ...]) -> None:
    """onnx.json read strictly (its format_version already checked): every key known, present and well typed."""
    _check_keys(manifest, MANIFEST_KEYS, path)
    _check_keys(manifest["encoder"], ENCODER_KEYS, path, "encoder.")
    if "preprocess" in manifest["encoder"]:
        _check_keys(manifest["encoder"]["preprocess"], PREPROCESS_KEYS, path, "encoder.preprocess.")
    if manifest["precision"] not in precisions:
        raise CaptionerError(f"{path}: key 'precision' must be one of {', '.join(precisions)}, got "
                             f"{manifest['precision']!r}")
    _check_keys(manifest["graphs"], {name: (_STR, True) for name in graphs}, path, "graphs.")
    for key in ("image_size", "in_channels", "channels"):
        if manifest["encoder"][key] < 1:
            raise CaptionerError(f"{path}: key 'encoder.{key}' must be >= 1, got {manifest['encoder'][key]}")


# graph -> ({input: shape}, {output: shape}); a dimension is an int, or a name / None where it is dynamic
GraphShapes = dict[str, tuple[dict[str, list], dict[str, list]]]


def check_graphs(shapes: GraphShapes, encoder: dict, vocab_size: int, folder: Path, vocab_file: str) -> None:
    """The graphs' declared input and output sizes against onnx.json's encoder, the vocabulary and each other:
    encoder.onnx gives what decoder_init.onnx takes, decoder_init's outputs are what decoder_step.onnx takes,
    and decoder_step's log_probs are one per word of the vocabulary."""
    def dims(graph: str, side: int, name: str) -> list:
        found = shapes[graph][side]
        if name not in found:
            raise CaptionerError(f"{folder / (graph + '.onnx')}: no {('input', 'output')[side]} named {name!r} "
                                 f"(has {', '.join(found)}); export the model again")
        return found[name]

    def agree(graph: str, what: str, size, expected, source: str) -> None:
        if isinstance(size, int) and isinstance(expected, int) and size != expected:  # names/None: dynamic
            raise CaptionerError(f"{folder / (graph + '.onnx')}: {what} is {size}, but {source} says {expected}; "
                                 f"the folder's files come from different exports: export the model again")

    images, features = dims("encoder", 0, "images"), dims("encoder", 1, "features")
    agree("encoder", "the input's channels", images[1], encoder["in_channels"], "onnx.json's encoder.in_channels")
    agree("encoder", "the input's size", images[2], encoder["image_size"], "onnx.json's encoder.image_size")
    agree("encoder", "the output's channels", features[1], encoder["channels"], "onnx.json's encoder.channels")
    for axis in (2, 3):
        agree("encoder", "the output's grid", features[axis], encoder["grid"][axis - 2], "onnx.json's encoder.grid")
        agree("decoder_init", "the input's grid", dims("decoder_init", 0, "features")[axis], features[axis],
              "encoder.onnx's output")
    agree("decoder_init", "the input's channels", dims("decoder_init", 0, "features")[1], features[1],
          "encoder.onnx's output")
    for name in ("h", "c", "regions", "projected"):
        made, taken = dims("decoder_init", 1, name), dims("decoder_step", 0, name)
        for axis in range(1, min(len(made), len(taken))):
            agree("decoder_step", f"input {name}'s size {axis}", taken[axis], made[axis], "decoder_init.onnx's output")
    agree("decoder_step", "the log_probs width", dims("decoder_step", 1, "log_probs")[1], vocab_size,
          f"the vocabulary ({vocab_file}, onnx.json's vocab_size)")
