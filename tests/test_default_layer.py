"""A default feature layer per backbone: with encoder.layer unset, the last feature stage the library itself
reports is hooked (timm's feature_info, open_clip's last transformer block, torchvision's last stage), logged
with its grid, and recorded resolved in the checkpoint (model/backbones.py default_layer)."""
from __future__ import annotations

import logging

import pytest
import yaml

from captioner.cli import main
from captioner.config import EncoderConfig, from_dict, inherit_preprocess, to_dict
from captioner.engine.infer.checkpoint import load_checkpoint
from captioner.model.caption_model import build_encoder, recorded_encoder_config
from captioner.model.encoder import HookedEncoder

from helpers import SMALL

DEFAULTS = [  # arch, the layer its library reports last, (C, H, W) at 64 px
    ("resnet18", "layer4", (512, 2, 2)),  # the design card's layer4 stays the ResNet default
    ("mobilenet_v3_small", "features", (576, 2, 2)),
    # (B, H, W, C) stages, read channels last; seconds to build
    pytest.param("swin_t", "features", (768, 2, 2), marks=pytest.mark.slow),
    pytest.param("timm/convnext_atto", "stages.3", (320, 2, 2), marks=pytest.mark.slow),
    ("timm/vit_tiny_patch16_224", "blocks.11", (192, 4, 4)),
    # open_clip builds its towers slowly on a CPU (seconds each): with the slow tests
    pytest.param("open_clip/ViT-B-32", "transformer.resblocks.11", (768, 2, 2), marks=pytest.mark.slow),
    pytest.param("open_clip/RN50", "layer4", (2048, 2, 2), marks=pytest.mark.slow),
]


def test_the_config_leaves_the_layer_to_the_backbone():
    assert EncoderConfig().layer == ""


@pytest.mark.parametrize("arch, layer, grid", DEFAULTS)
def test_each_library_reports_its_last_stage(arch, layer, grid, caplog):
    if arch.startswith(("timm/", "open_clip/")):
        pytest.importorskip(arch.split("/")[0])
    with caplog.at_level(logging.INFO, logger="captioner"):
        encoder = build_encoder(EncoderConfig(arch=arch, image_size=64))
    assert encoder.layer == layer and (encoder.channels, *encoder.grid) == grid
    lines = [r.getMessage() for r in caplog.records if "encoder.layer not set" in r.getMessage()]
    assert len(lines) == 1 and layer in lines[0] and f"{grid[0]}x{grid[1]}x{grid[2]} grid" in lines[0]
    assert recorded_encoder_config(EncoderConfig(arch=arch, image_size=64), encoder).layer == layer
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="captioner"):
        HookedEncoder(arch, layer, image_size=64)  # named: nothing to say
    assert "encoder.layer not set" not in caplog.text


def test_layers_marks_the_default(capsys):
    assert main(["layers", "resnet18", "--image-size", "64"]) == 0
    marked = [line for line in capsys.readouterr().out.splitlines() if "<- default" in line]
    assert len(marked) == 1 and marked[0].startswith("layer4 ") and "512x2x2" in marked[0]


def test_a_config_without_a_layer_continues_a_run_that_recorded_one():
    # An old checkpoint (or this version's) records layer4; a config leaving the layer unset inherits it, so
    # --resume/--init-from see no architecture change; a config naming another layer still differs.
    saved = to_dict(from_dict({"encoder": {"arch": "resnet18", "layer": "layer3"}}))
    assert from_dict(inherit_preprocess(to_dict(from_dict({"encoder": {"arch": "resnet18"}})), saved)).encoder.layer \
        == "layer3"
    named = to_dict(from_dict({"encoder": {"arch": "resnet18", "layer": "layer4"}}))
    assert inherit_preprocess(named, saved)["encoder"]["layer"] == "layer4"


@pytest.mark.slow
@pytest.mark.parametrize("arch, layer", [("open_clip/ViT-B-32", "transformer.resblocks.11"),
                                         ("timm/vit_tiny_patch16_224", "blocks.11")])
def test_train_without_a_layer_on_a_vit(arch, layer, tmp_path, caplog):
    pytest.importorskip(arch.split("/")[0])
    config = {"encoder": {"arch": arch, "weights": None}, "dataset": {"root": str(tmp_path / "data")}}
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(config))
    small = [o for o in SMALL
             if not o.startswith(("train.epochs", "dataset.synthetic_images", "train.checkpoint_every"))]
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="captioner"):
        assert main(["train", "--config", str(path), "--run-dir", str(run), "--device", "cpu", *small,
                     "dataset.synthetic_images=30", "train.epochs=1", "train.checkpoint_every=0"]) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["config"]["encoder"]["layer"] == layer  # recorded resolved
    assert state["progress"]["step"] >= 1
    assert f"encoder.layer not set: hooking {layer} of {arch}" in caplog.text
    # Resuming with the same layer-less config file is no architecture change.
    assert main(["train", "--resume", str(run), "--config", str(path), "--device", "cpu", *small,
                 "dataset.synthetic_images=30", "train.epochs=2", "train.checkpoint_every=0"]) == 0
    assert load_checkpoint(run / "last.pt")["progress"]["epoch"] >= 1
