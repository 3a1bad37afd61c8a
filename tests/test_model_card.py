"""The model card states what its folder's config.json states (backbone library and name, preprocessing, dtype,
runtime), shows metrics only when measured on the folder's model, refuses broken metrics, and names a licence."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from captioner.config import load_config
from captioner.engine.infer.model_card import check_metrics, model_card
from captioner.engine.infer.model_folder import folder_config
from captioner.errors import CaptionerError
from captioner.jobs.export import ExportJob, main as export
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary

from helpers import SHAPE_CAPTIONS, SMALL_MODEL, TINY, noise_pngs, varied_checkpoint

METRICS = {"split": "test", "split_images": 20, "beam_size": 3, "runtime": "torch", "bleu1": 0.8, "bleu4": 0.4,
           "cider": 1.5, "meteor": None}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return varied_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def card_claims(card: str) -> dict:
    """What a card says about the model, read back from its text (the lines model_card writes)."""
    encoder = re.search(r"^- Encoder: (\S+) `([^`]+)`, hooked at `([^`]+)`", card, re.M)
    size = re.search(r"resized to (\d+)x\1 \((\w+)\).*mean \(([^)]*)\) and std \(([^)]*)\)", card)
    dtype = re.search(r"weights stored as (\w+) in", card)
    onnx = re.search(r"ONNX Runtime runs the (\w+) graphs", card)
    floats = lambda text: [float(x) for x in text.split(", ")]  # noqa: E731
    return {"library": encoder[1], "encoder": encoder[2], "layer": encoder[3], "image_size": int(size[1]),
            "interpolation": size[2], "mean": floats(size[3]), "std": floats(size[4]), "dtype": dtype[1],
            "onnx_precision": onnx[1] if onnx else None}


def assert_card_matches(card: str, meta: dict, onnx_precision: str | None = None) -> None:
    said, arch, pre = card_claims(card), meta["architecture"], meta["preprocessing"]
    assert (said["library"], said["encoder"], said["layer"]) == (arch["library"], arch["encoder"], arch["layer"])
    assert (said["image_size"], said["interpolation"]) == (pre["image_size"], pre["interpolation"])
    for key in ("mean", "std"):  # written to 4 significant digits
        assert all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(said[key], pre[key], strict=True)), key
    assert said["dtype"] == meta["dtype"] and said["onnx_precision"] == onnx_precision
    front = yaml.safe_load(card.split("---\n")[1])
    assert arch["library"] in front["tags"] and arch["encoder"] in front["tags"]


def card_of(arch: str, layer: str, *overrides: str, **card_args) -> tuple[str, dict]:
    cfg = load_config(TINY, [f"encoder.arch={arch}", f"encoder.layer={layer}", *SMALL_MODEL, *overrides])
    vocab = Vocabulary.build(SHAPE_CAPTIONS)
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab))
    meta = folder_config(model, vocab, cfg, "float32", {"weights": "model.safetensors", "vocab": "vocab.json"})
    return model_card(meta, **card_args), meta


def test_torchvision_card_matches_its_config():
    card, meta = card_of("squeezenet1_1", "features", metrics=METRICS)
    assert_card_matches(card, meta)
    assert meta["architecture"]["library"] == "torchvision" and "| 0.800 | 0.400 | 1.500 |" in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "unknown" and "base_model" not in front
    assert [m["name"] for m in front["model-index"][0]["results"][0]["metrics"]] == ["BLEU-1", "BLEU-4", "CIDEr-D"]


@pytest.mark.slow  # imports timm and builds a ViT: seconds on a busy machine
def test_timm_vit_card_matches_its_config_and_names_the_weights_licence(monkeypatch):
    pytest.importorskip("timm")
    card, meta = card_of("timm/vit_tiny_patch16_224", "blocks.1", "encoder.interpolation=bilinear",
                         "encoder.mean=[0.5,0.5,0.5]", "encoder.std=[0.25,0.25,0.25]", license="apache-2.0")
    assert_card_matches(card, meta)
    assert meta["architecture"]["library"] == "timm" and meta["preprocessing"]["interpolation"] == "bilinear"
    assert "torchvision" not in card and "bicubic" not in card and "ImageNet" not in card
    # the weights' own record, as timm's pretrained_cfg holds it (a tag: the weights themselves never load here)
    meta["config"]["encoder"]["weights"] = "augreg_in21k_ft_in1k"
    card = model_card(meta, license="apache-2.0")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert "pretrained weights (`augreg_in21k_ft_in1k`) are under `apache-2.0`" in card


@pytest.mark.slow  # builds CLIP ViT-B-32 (150M parameters)
def test_open_clip_card_matches_its_config():
    pytest.importorskip("open_clip")
    card, meta = card_of("open_clip/ViT-B-32", "transformer.resblocks.1", "encoder.image_size=96")
    assert_card_matches(card, meta)
    assert meta["architecture"]["library"] == "open_clip" and "torchvision" not in card
    meta["config"]["encoder"]["weights"] = "laion2b_s34b_b79k"
    front = yaml.safe_load(model_card(meta).split("---\n")[1])
    assert front["base_model"] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def test_plain_yaml_card_without_huggingface_hub_says_the_same(monkeypatch):
    pytest.importorskip("huggingface_hub")
    hub_card, meta = card_of("squeezenet1_1", "features", metrics=METRICS, license="mit")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: the [hub] extra is missing
    plain_card = model_card(meta, metrics=METRICS, license="mit")
    assert yaml.safe_load(plain_card.split("---\n")[1]) == yaml.safe_load(hub_card.split("---\n")[1])
    assert plain_card.split("---\n", 2)[2] == hub_card.split("---\n", 2)[2]


@pytest.mark.parametrize("key, value", [("bleu4", float("nan")), ("bleu1", True), ("bleu4", 42), ("cider", -1),
                                        ("rouge_l", "0.5"), ("cider", float("inf"))])
def test_broken_metrics_are_refused_naming_the_key(key, value, checkpoint, tmp_path):
    with pytest.raises(CaptionerError, match=rf"^m\.json: {key} is .*must be a finite number in 0\.\.(1|10) "):
        check_metrics({**METRICS, key: value}, "m.json")
    metrics = tmp_path / "metrics_test.json"
    metrics.write_text(json.dumps({**METRICS, key: value}))  # NaN and Infinity as Python's json writes them
    with pytest.raises(CaptionerError, match=rf"metrics file .*metrics_test\.json: {key} is "):
        export(ExportJob(str(checkpoint), str(tmp_path / "model"), metrics=str(metrics)))
    assert not (tmp_path / "model").exists()


def test_bf16_card_leaves_out_metrics_measured_in_float32():
    card, meta = card_of("squeezenet1_1", "features")
    meta["dtype"] = "bfloat16"
    card = model_card(meta, metrics=METRICS)
    assert "model-index" not in yaml.safe_load(card.split("---\n")[1]) and "0.400" not in card
    assert "measured on the float32 PyTorch model this folder was exported from, not on this folder's bfloat16" in card


def test_int8_card_says_how_the_graphs_were_made_and_what_changes():
    card, meta = card_of("squeezenet1_1", "features", metrics=METRICS)
    assert "## int8 quantization" not in card  # float32 weights: nothing to say
    summary = {"encoder": "static QDQ int8 of the Conv layers", "feature_cosine": 0.98765, "feature_budget": 0.99,
               "budget_met": False, "decoder": "dynamic int8 of MatMul/Gemm", "calibration_images": 64,
               "calibration_source": "the train split of the model's csv dataset", "record": "quantization.json"}
    meta["files"]["onnx"] = "onnx.json"
    meta["onnx"] = {"opset": 17, "exporter": "torch.onnx.export", "precision": "int8",
                    "axes": {"fixed": {"note": "224 only"}}, "quantization": summary}
    card = model_card(meta, METRICS)
    assert_card_matches(card, meta, onnx_precision="int8")
    section = card.split("## int8 quantization")[1].split("\n## ")[0]
    assert "- Encoder: static QDQ int8 of the Conv layers. Its features measured cosine 0.9877 to float32's" in section
    assert "under the budget 0.99" in section and "Calibrated on 64 images from the train split" in section
    assert "int8 captions are not float32's" in section and "--runtime onnxruntime" in section
    assert "0.400" not in card  # float32's metrics stay out of an int8 folder's card
    # A folder exported before config.json recorded the summary still warns that captions change.
    del meta["onnx"]["quantization"]
    section = model_card(meta).split("## int8 quantization")[1]
    assert "Its features measured" not in section and section.lstrip().startswith("int8 captions are not")


def test_license_must_be_one_id(tmp_path):
    with pytest.raises(CaptionerError, match="--license 'MIT License' must be one licence id"):
        ExportJob(str(tmp_path / "best.pt"), str(tmp_path / "model"), license="MIT License")


@pytest.mark.slow  # exports and quantizes ONNX graphs
def test_int8_onnx_card_says_int8_and_shows_no_float32_metrics(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    metrics = tmp_path / "metrics_test.json"
    metrics.write_text(json.dumps({**METRICS, "checkpoint": str(checkpoint)}))
    photos = noise_pngs(tmp_path / "photos", 4, 64)
    out = tmp_path / "int8"
    export(ExportJob(str(checkpoint), str(out), format="onnx", quantize="int8", calibrate=str(photos),
                     metrics=str(metrics), license="mit"))
    meta = json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    precision = json.loads((out / meta["files"]["onnx"]).read_text())["precision"]
    assert precision == "int8"
    assert_card_matches(card, meta, onnx_precision=precision)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "mit" and "onnx" in front["tags"] and "model-index" not in front
    assert "0.400" not in card and "not on this folder's int8 ONNX graphs" in card and "--runtime onnxruntime" in card
    # The int8 section states the folder's own measurement, as quantization.json records it.
    record = json.loads((out / "quantization.json").read_text())
    assert f"Its features measured cosine {record['feature_error']['cosine_mean']:.4f} to float32's" in card
    assert f"Calibrated on 4 images from --calibrate {photos.name}" in card
    assert "int8 captions are not float32's" in card
    assert str(tmp_path) not in card and str(Path(checkpoint).parent) not in (out / "config.json").read_text()
