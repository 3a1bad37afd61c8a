"""A loaded model proves itself (engine/infer/integrity.py) and exports are byte-reproducible (model_id.py):
one corrupted model per kind of corruption, each refused in one line naming the file and the problem, on every
load path; the same checkpoint exported twice gives the same bytes; a resumed `caption` accepts its own output
after a re-export."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from captioner.cli import main as cli
from captioner.engine.infer.checkpoint import load_checkpoint, load_model
from captioner.engine.infer.model_folder import load_model_folder
from captioner.engine.infer.predictor import Predictor
from captioner.errors import CaptionerError
from captioner.jobs.export import ExportJob, main as export
from captioner.weights import read_safetensors_metadata, read_state_dict, write_safetensors

from helpers import noise_pngs, read_records, varied_checkpoint

DECODER_WEIGHT = "decoder.init_h.weight"  # any floating-point tensor the decoder computes with
try:
    import onnxruntime  # noqa: F401
    HAS_ORT = True
except ImportError:
    HAS_ORT = False


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return varied_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    export(ExportJob(str(checkpoint), str(out)))
    return out


@pytest.fixture(scope="module")
def onnx_folder(checkpoint, tmp_path_factory) -> Path:
    """The model folder with float32 ONNX graphs (exporting them takes seconds: the tests that use it are slow)."""
    if not HAS_ORT:
        pytest.skip("needs onnx and onnxruntime (the [onnx] extra)")
    out = tmp_path_factory.mktemp("export") / "model-onnx"
    export(ExportJob(str(checkpoint), str(out), format="onnx"))
    return out


# ---------------------------------------------------------------- corruptions, one per kind


def _weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    state = read_state_dict(path)
    change(state)
    write_safetensors(path, state, read_safetensors_metadata(path))


def _set(name, make):
    return lambda state: state.__setitem__(name, make(state[name]))


def _json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _reorder_vocab(folder: Path) -> None:  # the same words, two of them swapped: the same length
    def swap(data):
        data["tokens"][-1], data["tokens"][-2] = data["tokens"][-2], data["tokens"][-1]
    _json(folder / "vocab.json", swap)


def _shrink_vocab(folder: Path) -> None:  # a word fewer, and config.json's count made to agree
    _json(folder / "vocab.json", lambda data: data["tokens"].pop())
    _json(folder / "config.json", lambda meta: meta.__setitem__("vocab_size", meta["vocab_size"] - 1))


def _onnx_vocab_mismatch(folder: Path) -> None:  # vocab, config.json and onnx.json agree on a word more; the graphs not
    _json(folder / "vocab.json", lambda data: data["tokens"].append("zebra"))
    _json(folder / "config.json", lambda meta: (meta.__setitem__("vocab_size", meta["vocab_size"] + 1),
                                                meta.pop("vocab_sha256", None)))
    _json(folder / "onnx.json", lambda m: m.__setitem__("vocab_size", m["vocab_size"] + 1))


def _onnx(key_change):
    return lambda folder: _json(folder / "onnx.json", key_change)


FOLDER_CORRUPTIONS = {  # name -> (what is done to a copy of the folder, runtime, words the one line holds)
    "nan weight": (lambda f: _weights(f, _set(DECODER_WEIGHT, lambda t: t.index_fill(0, torch.tensor([2]),
                                                                                        float("nan")))),
                   "torch", ["model.safetensors", f"tensor {DECODER_WEIGHT} holds NaN"]),
    "inf weight": (lambda f: _weights(f, _set(DECODER_WEIGHT, lambda t: t.index_fill(1, torch.tensor([0]),
                                                                                        float("-inf")))),
                   "torch", ["model.safetensors", f"tensor {DECODER_WEIGHT} holds inf"]),
    "int-typed weight": (lambda f: _weights(f, _set(DECODER_WEIGHT, lambda t: (t * 100).to(torch.int64))),
                         "torch", ["model.safetensors", f"{DECODER_WEIGHT} is int64, expected float32"]),
    "bf16 weight in a float32 folder": (lambda f: _weights(f, _set(DECODER_WEIGHT, lambda t: t.bfloat16())),
                                        "torch", ["model.safetensors", "is bfloat16, expected float32",
                                                  "config.json records"]),
    "wrong shape": (lambda f: _weights(f, _set(DECODER_WEIGHT, lambda t: torch.cat([t, t[:1]]))),
                    "torch", ["model.safetensors", f"tensor {DECODER_WEIGHT} has shape", "config.json makes it"]),
    "missing tensor": (lambda f: _weights(f, lambda s: s.pop(DECODER_WEIGHT)),
                       "torch", ["model.safetensors does not match", "config.json", "1 missing", DECODER_WEIGHT]),
    "vocab reordered": (_reorder_vocab, "torch", ["vocab.json is not the vocabulary", "config.json"]),
    "vocab reordered (onnx)": (_reorder_vocab, "onnxruntime", ["vocab.json is not the vocabulary", "config.json"]),
    "vocab of wrong size": (_shrink_vocab, "torch", ["vocab.json is not the vocabulary", "14 words"]),
    "config.json without vocab_size": (lambda f: _json(f / "config.json", lambda m: m.pop("vocab_size")),
                                       "torch", ["config.json", "'vocab_size'", "missing"]),
    "config.json without dtype": (lambda f: _json(f / "config.json", lambda m: m.pop("dtype")),
                                  "torch", ["config.json", "'dtype'", "missing"]),
    "onnx.json without encoder": (_onnx(lambda m: m.pop("encoder")), "onnxruntime",
                                  ["onnx.json", "key 'encoder' is missing"]),
    "onnx.json wrong-typed key": (_onnx(lambda m: m["encoder"].__setitem__("channels", "many")), "onnxruntime",
                                  ["onnx.json", "key 'encoder.channels' must be an integer", '"many"']),
    "onnx.json unknown key": (_onnx(lambda m: m.__setitem__("vocab", 15)), "onnxruntime",
                              ["onnx.json", "unknown key 'vocab'"]),
    "onnx.json not an object": (lambda f: (f / "onnx.json").write_text("[1]"), "onnxruntime",
                                ["onnx.json must be a JSON object"]),
    "onnx.json vocab_size": (_onnx(lambda m: m.__setitem__("vocab_size", 99)), "onnxruntime",
                             ["onnx.json", "vocab_size is 99", "vocab.json holds 15 words"]),
    "onnx graphs vs vocab size": (_onnx_vocab_mismatch, "onnxruntime",
                                  ["decoder_step.onnx", "log_probs width is 15", "vocabulary", "says 16"]),
    "onnx.json encoder channels": (_onnx(lambda m: m["encoder"].__setitem__("channels", 7)), "onnxruntime",
                                   ["encoder.onnx", "output's channels is 512", "encoder.channels says 7"]),
}


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=[pytest.mark.slow] if runtime == "onnxruntime" else [])
                                  for kind, (_, runtime, _) in FOLDER_CORRUPTIONS.items()])
def test_a_corrupted_model_folder_is_refused_in_one_line(kind, request, tmp_path):
    corrupt, runtime, words = FOLDER_CORRUPTIONS[kind]
    broken = tmp_path / "model"
    shutil.copytree(request.getfixturevalue("onnx_folder" if runtime == "onnxruntime" else "folder"), broken)
    corrupt(broken)
    with pytest.raises(CaptionerError) as refused:
        Predictor.load(broken, "cpu", runtime=runtime)
    message = str(refused.value)
    assert all(w in message for w in words) and "\n" not in message and "internal error" not in message, message


def _checkpoint_with(checkpoint: Path, path: Path, change) -> Path:
    state = load_checkpoint(checkpoint)
    change(state)
    torch.save(state, path)  # as a hand edit would: save_checkpoint would record the new vocabulary's hash
    return path


CHECKPOINT_CORRUPTIONS = {
    "nan weight": (_set("model", lambda m: {**m, DECODER_WEIGHT: m[DECODER_WEIGHT] * float("nan")}),
                   [f"tensor {DECODER_WEIGHT} holds NaN"]),
    "int-typed weight": (_set("model", lambda m: {**m, DECODER_WEIGHT: m[DECODER_WEIGHT].round().to(torch.int32)}),
                         [f"tensor {DECODER_WEIGHT} is int32, expected a floating-point type"]),
    "vocab reordered": (_set("vocab", lambda v: v[:-2] + [v[-1], v[-2]]), ["vocab is not the vocabulary"]),
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CORRUPTIONS))
def test_a_corrupted_checkpoint_is_refused_in_one_line(kind, checkpoint, tmp_path):
    change, words = CHECKPOINT_CORRUPTIONS[kind]
    broken = _checkpoint_with(checkpoint, tmp_path / "best.pt", change)
    with pytest.raises(CaptionerError) as refused:
        load_model(broken)
    message = str(refused.value)
    assert str(broken) in message and all(w in message for w in words) and "\n" not in message, message


def test_the_command_line_refuses_it_before_any_caption(folder, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(folder, broken)
    _reorder_vocab(broken)
    images = noise_pngs(tmp_path / "images", 2, 32)
    out = tmp_path / "captions.jsonl"
    assert cli(["caption", "--checkpoint", str(broken), str(images), "--out", str(out), "--workers", "0",
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocab.json is not the vocabulary" in err, err
    assert not out.exists() or not out.read_text().strip()


def test_folders_without_the_vocabulary_hash_load_as_before(folder, tmp_path):
    old = tmp_path / "model"
    shutil.copytree(folder, old)
    _json(old / "config.json", lambda meta: meta.pop("vocab_sha256", None))
    _reorder_vocab(old)  # undetectable without the hash, as before: it loads
    model, vocab, _ = load_model_folder(old)
    assert vocab.tokens[-1] == json.loads((folder / "vocab.json").read_text())["tokens"][-2]


# ---------------------------------------------------------------- byte-reproducible exports, a stable model id


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("fmt", ["safetensors", pytest.param("onnx", marks=pytest.mark.slow)])
def test_the_same_checkpoint_exported_again_gives_the_same_bytes(fmt, checkpoint, tmp_path):
    if fmt == "onnx" and not HAS_ORT:
        pytest.skip("needs onnx and onnxruntime (the [onnx] extra)")
    # safetensors' metadata order changed from one save to the next: three exports, one set of bytes
    exports = [_digests(Path(export(ExportJob(str(checkpoint), str(tmp_path / f"m{i}"), format=fmt))["out"]))
               for i in range(3)]
    assert exports[0] == exports[1] == exports[2]
    assert "model.safetensors" in exports[0] and ("encoder.onnx" in exports[0]) == (fmt == "onnx")


@pytest.mark.slow  # four models loaded, three exports: seconds
def test_the_model_id_comes_from_the_tensors(checkpoint, folder, tmp_path):
    again = tmp_path / "again"
    export(ExportJob(str(folder), str(again)))  # re-exported from the folder: another config.json, same model
    bf16 = tmp_path / "bf16"
    export(ExportJob(str(checkpoint), str(bf16), dtype="bf16"))
    ids = {name: Predictor.load(path, "cpu").model_hash()
           for name, path in {"checkpoint": checkpoint, "folder": folder, "again": again, "bf16": bf16}.items()}
    assert ids["checkpoint"] == ids["folder"] == ids["again"] != ids["bf16"]
    assert len(ids["folder"]) == 16
    if HAS_ORT:  # the ONNX graphs run by another runtime: another id, the same after a re-export
        onnx = [tmp_path / "onnx1", tmp_path / "onnx2"]
        for out in onnx:
            export(ExportJob(str(checkpoint), str(out), format="onnx"))
        ort = [Predictor.load(out, "cpu", runtime="onnxruntime").model_hash() for out in onnx]
        assert ort[0] == ort[1] and ort[0] not in ids.values()


@pytest.mark.slow  # three exports, four caption runs: seconds
def test_a_resumed_caption_accepts_its_own_output_after_a_re_export(checkpoint, tmp_path, capsys):
    images = noise_pngs(tmp_path / "images", 4, 32)
    files = sorted(images.iterdir())
    model, out, gallery = tmp_path / "model", tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    base = ["caption", "--checkpoint", str(model), "--out", str(out), "--workers", "0", "--device", "cpu",
            "--html", str(gallery)]
    export(ExportJob(str(checkpoint), str(model)))
    assert cli([*base, *map(str, files[:2])]) == 0
    export(ExportJob(str(checkpoint), str(model), overwrite=True))
    assert cli([*base, *map(str, files[:3])]) == 0, capsys.readouterr().err
    # the checkpoint itself holds the same tensors, vocabulary and config: the same model
    assert cli([*base[:2], str(checkpoint), *base[3:], *map(str, files[:3])]) == 0, capsys.readouterr().err
    # A file written when the id was the files' hash (captioner before this one) is the same model's too.
    legacy = Predictor.load(model, "cpu").legacy_model_hash()
    records = read_records(out)
    out.write_text("".join(json.dumps({**r, "model": legacy}) + "\n" for r in records))
    current = Predictor.load(model, "cpu").model_hash()
    page = gallery.read_text()
    assert f"model {current}" in page
    gallery.write_text(page.replace(f"model {current}", f"model {legacy}"))
    assert cli([*base, *map(str, files)]) == 0, capsys.readouterr().err
    records = read_records(out)
    assert len(records) == 4 and {r["model"] for r in records[3:]} == {current}
    assert gallery.read_text().count('class="entry') == 4
    # Another model is still refused.
    bf16 = tmp_path / "bf16"
    export(ExportJob(str(checkpoint), str(bf16), dtype="bf16"))
    capsys.readouterr()
    assert cli([*base[:2], str(bf16), *base[3:], str(images)]) == 2
    assert "made otherwise" in capsys.readouterr().err
