"""Model folders: `captioner export` writes one, every command loads it without torch.load, formats are versioned."""
from __future__ import annotations

import json

import pytest
import torch

from captioner.cli import main as cli
from captioner.engine.infer.checkpoint import load_model
from captioner.engine.infer.model_folder import FORMAT_VERSION, load_model_folder, read_folder_config
from captioner.engine.infer.predictor import Predictor
from captioner.errors import CaptionerError
from captioner.jobs.export import ExportJob, main as export
from captioner.weights import read_state_dict, write_safetensors

from helpers import varied_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return varied_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    export(ExportJob(str(checkpoint), str(out)))
    return out


def _no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called while loading a model folder")
    monkeypatch.setattr(torch, "load", refuse)


def test_export_writes_the_folder_and_it_loads_without_torch_load(checkpoint, folder, monkeypatch):
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["vocab_size"] == len(json.loads((folder / "vocab.json").read_text())["tokens"]) == 15
    assert meta["files"] == {"weights": "model.safetensors", "vocab": "vocab.json", "card": "README.md"}
    assert meta["config"]["encoder"]["arch"] == "squeezenet1_1" and "compute" not in meta["config"]
    reference, vocab, cfg = load_model(checkpoint)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    a = Predictor.load(checkpoint, "cpu").caption_batch(images)
    _no_torch_load(monkeypatch)
    loaded, loaded_vocab, loaded_cfg = load_model_folder(folder)
    assert loaded_cfg.dataset.root == "synthetic" != cfg.dataset.root  # a name: the folder holds no machine's paths
    loaded_cfg.dataset.root = cfg.dataset.root
    assert loaded_vocab == vocab and loaded_cfg == cfg
    expected, got = reference.state_dict(), loaded.state_dict()
    never_computed = {f"encoder.{k}" for k in reference.encoder.uncomputed_keys()}
    assert never_computed == {"encoder.backbone.classifier.1.weight", "encoder.backbone.classifier.1.bias"}
    assert all(torch.equal(expected[k], got[k]) for k in expected if k not in never_computed)
    assert all(not got[k].any() for k in never_computed)  # left out of the file, loaded as zeros
    b = Predictor.load(folder, "cpu").caption_batch(images)
    assert [c.caption for c in a] == [c.caption for c in b] and [c.score for c in a] == [c.score for c in b]


def test_bf16_export_halves_the_weights(checkpoint, folder, tmp_path, monkeypatch):
    out = tmp_path / "bf16"
    result = export(ExportJob(str(checkpoint), str(out), dtype="bf16"))
    weights = result["files"]["model.safetensors"]
    assert 0.49 < weights / (folder / "model.safetensors").stat().st_size < 0.51
    state = read_state_dict(out / "model.safetensors")
    assert {t.dtype for t in state.values()} <= {torch.bfloat16, torch.int64}  # BatchNorm step counts stay int
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _no_torch_load(monkeypatch)
    model, _, _ = load_model_folder(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # loaded into the float32 model


def test_a_folder_re_exports_and_a_run_folder_is_named(folder, checkpoint, tmp_path, monkeypatch):
    _no_torch_load(monkeypatch)
    export(ExportJob(str(folder), str(tmp_path / "bf16"), dtype="bf16"))  # a model folder as the source
    meta = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["source"]["checkpoint"] == "best.pt" and meta["source"]["step"] == 42
    with pytest.raises(CaptionerError, match=r"a run folder\? give its checkpoint, .*best\.pt"):
        Predictor.load(checkpoint.parent, "cpu")


def test_model_card_front_matter_and_metrics(checkpoint, tmp_path):
    metrics = tmp_path / "metrics_test.json"
    metrics.write_text(json.dumps({"checkpoint": str(checkpoint), "split": "test", "split_images": 200,
                                   "beam_size": 3, "bleu1": 0.81, "bleu4": 0.52, "meteor": None, "rouge_l": 0.7,
                                   "cider": 1.234, "skipped": {"meteor": "java not found"}}))
    out = tmp_path / "model"
    export(ExportJob(str(checkpoint), str(out), metrics=str(metrics), push=None))
    card = (out / "README.md").read_text()
    import yaml
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "image-to-text" and front["library_name"] == "captioner"
    assert front["license"] == "unknown"
    values = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert values == {"BLEU-1": 0.81, "BLEU-4": 0.52, "ROUGE-L": 0.7, "CIDEr-D": 1.234}
    assert "| 0.810 | 0.520 | 0.700 | 1.234 |" in card and "test split (200 images)" in card
    assert "METEOR (java not found)" in card
    assert "squeezenet1_1" in card and "synthetic shapes" in card and "after epoch 3 (step 42)" in card
    assert 'Captioner.from_pretrained("' in card


def test_format_versions_and_broken_folders_are_one_line(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.safetensors", "vocab.json"):
        (bad / name).write_bytes((folder / name).read_bytes())
    meta = json.loads((folder / "config.json").read_text())
    cases = [({**meta, "format_version": FORMAT_VERSION + 1}, "newer than this captioner"),
             ({**meta, "format_version": 0}, "older than this captioner"),
             ({**meta, "format": "transformers"}, "not a captioner model folder"),
             ({**meta, "files": {**meta["files"], "weights": "../elsewhere.safetensors"}}, "must be a file name"),
             ({**meta, "files": {**meta["files"], "weights": "gone.safetensors"}}, "lacks gone.safetensors"),
             ({**meta, "vocab_size": 5}, "vocab_size 5")]
    for content, message in cases:
        (bad / "config.json").write_text(json.dumps(content))
        with pytest.raises(CaptionerError, match=message):
            load_model_folder(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CaptionerError, match="not valid JSON"):
        read_folder_config(bad)
    (bad / "config.json").unlink()
    with pytest.raises(CaptionerError, match="without config.json"):
        Predictor.load(bad, "cpu")
    (bad / "config.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CaptionerError, match="not a readable state_dict"):
        load_model_folder(bad)


def test_export_refuses_to_clobber_and_overwrites_model_folders(checkpoint, tmp_path, capsys):
    out = tmp_path / "model"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(other)]) == 2
    assert "non-empty folder" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(other), "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "mine"
    assert cli(["-q", "export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert cli(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["-q", "export", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite",
                "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    for argv, message in [(["--dtype", "fp16"], "invalid choice"), (["--format", "tflite"], "invalid choice"),
                          (["--push", "not a repo"], "not a Hub repo id"),
                          (["--metrics", str(tmp_path / "none.json")], "not found|cannot read")]:
        with pytest.raises(SystemExit) if "invalid choice" in message else _no_raise():
            code = cli(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), *argv])
            assert code == 2
        assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_encoder_weights_read_safetensors(tmp_path):
    from captioner.model.encoder import HookedEncoder
    torch.manual_seed(3)
    source = HookedEncoder("squeezenet1_1", "features", None, image_size=64)
    write_safetensors(tmp_path / "backbone.safetensors", source.backbone.state_dict())
    torch.save(source.backbone.state_dict(), tmp_path / "backbone.pth")
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    for name in ("backbone.safetensors", "backbone.pth"):
        loaded = HookedEncoder("squeezenet1_1", "features", str(tmp_path / name), image_size=64)
        assert torch.equal(loaded(images), source(images))
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(CaptionerError, match="broken.safetensors is not a readable state_dict"):
        HookedEncoder("squeezenet1_1", "features", str(tmp_path / "broken.safetensors"), image_size=64)


def test_runtime_is_checked_in_one_line(folder):
    with pytest.raises(CaptionerError, match="runtime 'tensorrt' is not available; valid: torch"):
        Predictor.load(folder, "cpu", runtime="tensorrt")


def _tampered(folder, tmp_path, edit, name="tampered"):
    """A copy of folder whose config.json edit(meta) changed (or whose vocab.json edit wrote, given "vocab")."""
    out = tmp_path / name
    out.mkdir()
    for f in ("model.safetensors", "vocab.json", "config.json"):
        (out / f).write_bytes((folder / f).read_bytes())
    meta = json.loads((folder / "config.json").read_text())
    edit(meta)
    (out / "config.json").write_text(json.dumps(meta))
    return out


def _drop(*keys):
    def edit(meta):
        holder = meta
        for k in keys[:-1]:
            holder = holder[k]
        del holder[keys[-1]]
    return edit


def _put(value, *keys):
    def edit(meta):
        holder = meta
        for k in keys[:-1]:
            holder = holder[k]
        holder[keys[-1]] = value
    return edit


TAMPERING = [  # (edit of config.json, what the one-line error must say besides the file name)
    (_drop("config", "encoder", "image_size"), "config.encoder.image_size is missing"),
    (_drop("config", "encoder", "arch"), "config.encoder.arch is missing"),
    (_drop("config", "decode"), "config.decode is missing"),
    (_drop("config", "decode", "max_len"), "config.decode.max_len is missing"),
    (_drop("config", "decode", "suppress_unk"), "config.decode.suppress_unk is missing"),  # decode block states it
    (_drop("config", "model", "embed_dim"), "config.model.embed_dim is missing"),
    (_put(224, "config", "encoder", "image_size"), r"preprocessing.image_size \(64\) disagrees with "
                                                   r"config.encoder.image_size \(224\)"),
    (_put([0.0, 0.0, 0.0], "config", "encoder", "mean"), "preprocessing.mean .* disagrees with config.encoder.mean"),
    (_put(5, "config", "decode", "max_len"), r"decode.max_len \(12\) disagrees with config.decode.max_len \(5\)"),
    (_put([0.5, 0.5, 0.5], "preprocessing", "std"), "preprocessing.std .* disagrees with the model's std"),
    (_put("resnet18", "architecture", "encoder"), "architecture.encoder .* disagrees with config.encoder.arch"),
    (_put("128", "config", "model", "embed_dim"), "config.model.embed_dim expects int"),
    (_put("1e-3", "config", "model", "dropout"), "config.model.dropout expects float"),  # JSON: never text
    (_put(1, "config", "encoder", "foo"), "unknown key config.encoder.foo"),
]


@pytest.mark.parametrize("edit, message", TAMPERING, ids=[m.split()[0] for _, m in TAMPERING])
def test_a_tampered_config_json_is_one_line_naming_the_key(folder, tmp_path, edit, message, capsys):
    bad = _tampered(folder, tmp_path, edit)
    with pytest.raises(CaptionerError, match=message) as e:
        load_model_folder(bad)
    text = str(e.value)
    assert text.startswith(f"{bad / 'config.json'}: ") and "\n" not in text and len(text) < 200 + len(str(bad))
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(tmp_path / "photo.png")
    code = cli(["caption", "--device", "cpu", "--checkpoint", str(bad), str(tmp_path / "photo.png")])
    err = capsys.readouterr().err
    assert code == 2 and "config.json" in err and "Traceback" not in err


def test_older_folders_without_later_keys_still_load(folder, tmp_path):
    """Keys added after format_version 1 began: a folder exported before them (and without the top-level block that
    would state them) loads as it always did."""
    def edit(meta):
        for key in ("mean", "std", "interpolation"):
            del meta["config"]["encoder"][key]
        del meta["preprocessing"]["mean"], meta["preprocessing"]["std"], meta["preprocessing"]["interpolation"]
        for key in ("block_ngram", "suppress_unk", "groups", "diversity", "top_k", "top_p", "num_return_sequences"):
            del meta["config"]["decode"][key], meta["decode"][key]
    _, _, cfg = load_model_folder(_tampered(folder, tmp_path, edit))
    assert cfg.decode.suppress_unk is False and cfg.decode.max_len == 12  # the legacy default, the folder's value
    _, _, cfg = load_model_folder(folder)  # untouched
    assert cfg.decode.suppress_unk is True and cfg.encoder.image_size == 64


def test_vocab_as_a_bare_list_says_the_shape(folder, tmp_path):
    bad = _tampered(folder, tmp_path, lambda meta: None)
    (bad / "vocab.json").write_text(json.dumps(json.loads((folder / "vocab.json").read_text())["tokens"]))
    with pytest.raises(CaptionerError, match=r'must be a JSON object \{"tokens": \[word, ...\]\}, got a JSON list'):
        load_model_folder(bad)
