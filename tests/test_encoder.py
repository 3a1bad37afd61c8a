import pytest
import torch

from captioner.model.encoder import HookedEncoder, list_layers
from captioner.errors import CaptionerError


@pytest.fixture(scope="module")
def resnet152():
    return HookedEncoder("resnet152", "layer4", weights=None, image_size=224)


@pytest.mark.slow  # ResNet-152 at full size: seconds of CPU per image
def test_resnet152_layer4_shapes_224_and_448(resnet152):
    assert resnet152.channels == 2048 and resnet152.grid == (7, 7) and resnet152.reduction == 32
    out = resnet152(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8))
    assert out.shape == (2, 2048, 7, 7)
    assert resnet152(torch.rand(1, 3, 448, 448)).shape == (1, 2048, 14, 14)
    assert torch.isfinite(out).all()


@pytest.mark.slow  # two ResNet-152s built, one run
def test_nested_layer_and_eleven_channels():
    nested = HookedEncoder("resnet152", "layer3.35.conv3", image_size=224)
    assert nested.channels == 1024 and nested.grid == (14, 14)
    bands = HookedEncoder("resnet152", "layer4", in_channels=11, image_size=224)
    conv1 = bands.backbone.conv1
    assert conv1.weight.shape == (64, 11, 7, 7)
    # every band's filter is the (rescaled) mean of the RGB filters
    assert torch.allclose(conv1.weight[:, 0], conv1.weight[:, 10])
    assert bands(torch.rand(2, 11, 224, 224)).shape == (2, 2048, 7, 7)


def test_nothing_after_the_hooked_layer_runs():
    enc = HookedEncoder("resnet18", "layer3", image_size=64)
    called = []
    for name in ("layer4", "avgpool", "fc"):
        enc.backbone.get_submodule(name).register_forward_hook(lambda *a, name=name: called.append(name))
    out = enc(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 256, 4, 4) and called == []


def test_frozen_backbone_stays_in_eval_and_hook_is_removed():
    enc = HookedEncoder("resnet18", "layer4", image_size=64)
    enc.train()
    assert not enc.backbone.training
    assert not any(p.requires_grad for p in enc.parameters())
    target = enc.backbone.layer4
    assert len(target._forward_hooks) == 1
    enc.close()
    assert len(target._forward_hooks) == 0


def test_bad_layer_lists_close_matches():
    with pytest.raises(CaptionerError) as e:
        HookedEncoder("resnet18", "layer9", image_size=64)
    msg = str(e.value)
    assert "layer9" in msg and "layer4" in msg and "captioner layers resnet18" in msg and "\n" not in msg


def test_bad_arch_and_weights_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(CaptionerError, match="unknown encoder.arch"):
        HookedEncoder("resnet153")
    with pytest.raises(CaptionerError, match="not found"):
        HookedEncoder("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(CaptionerError, match="valid names"):
        HookedEncoder("resnet18", weights="IMAGENET9")
    # A weight enum that is not cached and cannot be downloaded names the path to put it at.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CaptionerError) as e:
        HookedEncoder("resnet18", weights="IMAGENET1K_V1")
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value) and "\n" not in str(e.value)


def test_local_weights_file_with_wrapper_prefix(tmp_path):
    source = HookedEncoder("resnet18", image_size=64)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.backbone.state_dict().items()}}, path)
    loaded = HookedEncoder("resnet18", weights=str(path), image_size=64)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(source(x), loaded(x))


def test_list_layers_reports_shapes():
    layers = {info.name: info for info in list_layers("resnet18", 448)}
    assert layers["layer4"].shape == (512, 14, 14) and layers["layer3.1.conv2"].shape == (256, 28, 28)
    assert layers["layer4"].grid == (512, 14, 14) and layers["fc"].shape == (1000,) and layers["fc"].grid is None
