"""timm and open_clip backbones behind the one HookedEncoder: random weights, small inputs, no network."""
import sys
from importlib.util import find_spec

import pytest
import torch
import torchvision

from captioner.errors import CaptionerError
from captioner.model.backbones import TokenLayout
from captioner.model.encoder import HookedEncoder, list_layers, remap_by_order, to_grid

# Found, not imported: timm and open_clip take seconds to import, and every pytest-xdist worker collects this file.
pytestmark = pytest.mark.skipif(not (find_spec("timm") and find_spec("open_clip")),
                                reason='the [timm] and [clip] extras are not installed: pip install -e ".[timm,clip]"')

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def clip_b32():
    """open_clip ViT-B-32's visual tower at 96 px (a 3x3 patch grid), hooked at its 6th block."""
    return HookedEncoder("open_clip/ViT-B-32", "transformer.resblocks.5", image_size=96)


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _library_intermediate(encoder: HookedEncoder, images: torch.Tensor, index: int) -> torch.Tensor:
    """The library's own (B, C, H, W) output of block/stage index, for the same normalised images."""
    x = encoder.normalize(images)
    if encoder.source == "open_clip":
        return encoder.backbone.forward_intermediates(x, indices=[index], intermediates_only=True,
                                                      output_fmt="NCHW")["image_intermediates"][0]
    extra = {"norm": False} if hasattr(encoder.backbone, "blocks") else {}
    return encoder.backbone.forward_intermediates(x, indices=[index], intermediates_only=True, **extra)[0]


@pytest.mark.parametrize("arch, layer, index, size, grid", [
    ("timm/resnet18d", "layer3", 3, 64, (256, 4, 4)),
    ("timm/convnext_atto", "stages.2", 2, 64, (160, 4, 4)),
    ("timm/vit_tiny_patch16_224", "blocks.5", 5, 64, (192, 4, 4)),  # 1 class token + 16 patches -> 4x4
])
def test_timm_hook_gives_the_grid_the_library_computes(arch, layer, index, size, grid):
    encoder = HookedEncoder(arch, layer, image_size=size)
    assert (encoder.channels, *encoder.grid) == grid and encoder.reduction == 16
    images = _images(size)
    with torch.no_grad():
        hooked = encoder(images)
        encoder.close()  # the library's own forward must not stop at our hook
        own = _library_intermediate(encoder, images, index)
    assert hooked.shape == (2, *grid)
    assert (hooked - own).abs().max().item() <= 1e-5


def test_open_clip_hook_gives_the_grid_the_library_computes(clip_b32):
    assert (clip_b32.channels, *clip_b32.grid) == (768, 3, 3) and clip_b32.reduction == 32
    images = _images(96)
    with torch.no_grad():
        hooked = clip_b32(images)
        clip_b32._handle.remove()  # the library's own forward must not stop at our hook
        try:
            own = _library_intermediate(clip_b32, images, 5)
        finally:
            clip_b32._handle = clip_b32.backbone.transformer.resblocks[5].register_forward_hook(clip_b32._hook)
    assert hooked.shape == (2, 768, 3, 3)
    assert (hooked - own).abs().max().item() <= 1e-5


def test_nothing_after_the_hooked_block_runs():
    encoder = HookedEncoder("timm/vit_tiny_patch16_224", "blocks.2", image_size=64)
    called = []
    for name in ("blocks.3", "norm", "head"):
        encoder.backbone.get_submodule(name).register_forward_hook(lambda *a, name=name: called.append(name))
    assert encoder(_images(64)).shape == (2, 192, 4, 4) and called == []


def test_tokens_become_a_row_major_grid_without_prefix_tokens():
    # (B, 1 class + 4 registers + 2x3 patches, C): patch k sits at row k // 3, column k % 3 of a 2x6 image's grid
    patches = torch.arange(6.0).view(1, 6, 1).expand(2, 6, 4)
    tokens = torch.cat([torch.full((2, 5, 4), -1.0), patches], dim=1)
    grid = to_grid(tokens, TokenLayout(prefix_tokens=5), (2 * 16, 3 * 16))
    assert grid.shape == (2, 4, 2, 3) and grid[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    # a patch embedding's output has no prefix tokens; sequence-first tokens are transposed first
    assert to_grid(patches, TokenLayout(prefix_tokens=5), (32, 48)).shape == (2, 4, 2, 3)
    assert torch.equal(to_grid(tokens.transpose(0, 1), TokenLayout(5, sequence_first=True), (32, 48)), grid)
    nhwc = torch.randn(2, 3, 5, 7)
    assert torch.equal(to_grid(nhwc, TokenLayout(channels_last=True), (48, 80)), nhwc.permute(0, 3, 1, 2))
    assert to_grid(torch.randn(2, 7, 4), TokenLayout(prefix_tokens=1), (32, 32)) is None  # 7 or 6 is no 2-D grid
    assert to_grid(torch.randn(2, 10), TokenLayout(), (32, 32)) is None


def _changed_cells(grid_a: torch.Tensor, grid_b: torch.Tensor) -> list[tuple[int, int]]:
    """(row, column) of the grid cells whose features differ between two (1, C, H, W) grids."""
    return [tuple(cell) for cell in ((grid_a - grid_b).abs().amax(dim=(0, 1)) > 1e-6).nonzero().tolist()]


def test_grid_cells_line_up_with_image_patches(clip_b32):
    """A change inside one patch shows in that patch's grid cell only (per-token layers), where the gallery draws it."""
    image = _images(64, 1)
    changed = image.clone()
    changed[:, :, 16:32, 48:64] = 255 - changed[:, :, 16:32, 48:64]  # the patch at row 1, column 3 of a 4x4 grid
    vit = HookedEncoder("timm/vit_tiny_patch16_224", "blocks.0.norm1", image_size=64)  # per token, class token first
    with torch.no_grad():
        assert _changed_cells(vit(image), vit(changed)) == [(1, 3)]
    captured = []
    handle = clip_b32.backbone.ln_pre.register_forward_hook(lambda m, i, out: captured.append(out))
    image = _images(96, 1)
    changed = image.clone()
    changed[:, :, 64:96, 0:32] = 0  # row 2, column 0 of CLIP B/32's 3x3 grid at 96 px
    try:
        with torch.no_grad():
            clip_b32(image), clip_b32(changed)
    finally:
        handle.remove()
    grids = [to_grid(out, clip_b32.layout, (96, 96)) for out in captured]
    assert _changed_cells(*grids) == [(2, 0)]


def test_layers_lists_modules_with_shapes_and_grids():
    convnext = {i.name: i for i in list_layers("timm/convnext_atto", 64)}
    assert convnext["stages.2"].grid == (160, 4, 4) and convnext["stem"].shape == (40, 16, 16)
    vit = {i.name: i for i in list_layers("timm/vit_tiny_patch16_224", 64)}
    assert vit["blocks.11"].shape == (17, 192) and vit["blocks.11"].grid == (192, 4, 4)
    assert vit["patch_embed"].grid == (192, 4, 4)  # 16 patch tokens, no class token yet
    assert vit["blocks.11.mlp.fc1"].grid == (768, 4, 4) and vit["head"].grid is None  # (192,): pooled


@pytest.mark.slow  # builds CLIP ViT-B-32 (150M parameters) once more
def test_layers_lists_open_clip_blocks_as_grids():
    clip = {i.name: i for i in list_layers("open_clip/ViT-B-32", 96)}
    assert clip["conv1"].shape == (768, 3, 3) and clip["conv1"].grid == (768, 3, 3)
    assert clip["transformer.resblocks.11"].shape == (10, 768) and clip["transformer.resblocks.11"].grid == (768, 3, 3)


def test_preprocessing_comes_from_the_model_unless_the_config_sets_it(clip_b32):
    assert clip_b32.preprocess.mean == CLIP_MEAN and clip_b32.interpolation == "bicubic"
    vit = HookedEncoder("timm/vit_tiny_patch16_224", "blocks.0", image_size=32)
    assert vit.preprocess.mean == (0.5, 0.5, 0.5) and vit.preprocess.std == (0.5, 0.5, 0.5)
    assert HookedEncoder("timm/dla46_c", "level3", image_size=64).interpolation == "bilinear"  # its weights' own
    mine = HookedEncoder("timm/vit_tiny_patch16_224", "blocks.0", image_size=32, mean=[0.1, 0.2, 0.3],
                         std=[1, 1, 1], interpolation="bicubic")
    assert mine.preprocess.mean == (0.1, 0.2, 0.3) and mine.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(CaptionerError, match="one per input channel"):
        HookedEncoder("timm/vit_tiny_patch16_224", "blocks.0", image_size=32, mean=[0.5, 0.5])
    with pytest.raises(CaptionerError, match="bicubic, bilinear"):
        HookedEncoder("timm/vit_tiny_patch16_224", "blocks.0", image_size=32, interpolation="lanczos")


def test_four_band_vit_adapts_its_patch_embedding():
    encoder = HookedEncoder("timm/vit_tiny_patch16_224", "blocks.1", in_channels=4, image_size=32)
    assert encoder.backbone.patch_embed.proj.weight.shape == (192, 4, 16, 16)
    assert len(encoder.preprocess.mean) == 4 and encoder(torch.rand(2, 4, 32, 32)).shape == (2, 192, 2, 2)


def test_timm_weights_file_safetensors_with_head(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    import timm
    torch.manual_seed(1)
    full = timm.create_model("convnext_atto", num_classes=10)  # a file with its classifier: dropped on load
    path = tmp_path / "convnext_atto.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = HookedEncoder("timm/convnext_atto", "stages.3", weights=str(path), image_size=64)
    assert torch.equal(loaded.backbone.stem[0].weight, full.stem[0].weight)
    with torch.no_grad():
        own = full.forward_features(loaded.normalize(_images(64)))
    assert (loaded(_images(64)) - own).abs().max().item() <= 1e-5


@pytest.mark.slow  # builds CLIP ViT-B-32 twice more
def test_open_clip_weights_file_full_model_or_visual_only(tmp_path, clip_b32):
    visual = {k: v.clone() for k, v in clip_b32.backbone.state_dict().items()}
    full = {**{"visual." + k: v for k, v in visual.items()}, "token_embedding.weight": torch.zeros(3, 2)}
    torch.save(full, tmp_path / "open_clip_pytorch_model.bin")
    loaded = HookedEncoder("open_clip/ViT-B-32", "transformer.resblocks.5", image_size=96,
                           weights=str(tmp_path / "open_clip_pytorch_model.bin"))
    images = _images(96)
    with torch.no_grad():
        assert torch.equal(loaded(images), clip_b32(images))
    torch.save({"state_dict": visual}, tmp_path / "visual.pth")  # a visual tower saved on its own
    again = HookedEncoder("open_clip/ViT-B-32", "transformer.resblocks.5", image_size=96,
                          weights=str(tmp_path / "visual.pth"))
    assert torch.equal(again.backbone.conv1.weight, clip_b32.backbone.conv1.weight)


def test_bad_names_tags_and_files_are_one_line_errors(tmp_path):
    cases = [
        (("timm/convnext_tny", "stages.3"), "timm/convnext_tiny"),
        (("timm/convnext_tiny.fb_in1k", "stages.3"), "encoder.arch=timm/convnext_tiny encoder.weights=fb_in1k"),
        (("timm/convnext_atto", "stages.3", "imagenet"), "valid tags: d2_in1k"),
        (("open_clip/ViT-B-33", "transformer"), "open_clip/ViT-B-32"),
        (("open_clip/ViT-B-32", "transformer", "laion9"), "valid tags: openai"),
        (("open_clip/ViT-B-16", "transformer", "openai"), "use encoder.arch=open_clip/ViT-B-16-quickgelu"),
        (("tf/efficientnet", "x"), "one of torchvision, timm, open_clip"),
        (("timm/convnext_atto", "stage.3"), "captioner layers timm/convnext_atto"),
        (("timm/convnext_atto", "head", None, 3, 64), "not a (channels, height, width) feature map"),
        (("timm/convnext_atto", "stages.3", str(tmp_path / "none.safetensors")), "not found"),
    ]
    for args, expected in cases:
        with pytest.raises(CaptionerError) as e:
            HookedEncoder(*args)
        assert expected in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CaptionerError, match="bad.safetensors is not a readable state_dict"):
        HookedEncoder("timm/convnext_atto", "stages.3", str(tmp_path / "bad.safetensors"))


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    monkeypatch.setitem(sys.modules, "open_clip", None)
    for arch, extra in (("timm/convnext_atto", "timm"), ("open_clip/ViT-B-32", "clip")):
        with pytest.raises(CaptionerError) as e:
            HookedEncoder(arch, "stages.3", image_size=64)
        assert f'pip install "captioner[{extra}]"' in str(e.value) and "\n" not in str(e.value)


def test_uncached_tag_offline_is_one_line(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CaptionerError) as e:
        HookedEncoder("timm/convnext_atto", "stages.3", weights="d2_in1k", image_size=64)
    message = str(e.value)
    assert "huggingface.co/timm/convnext_atto.d2_in1k" in message and "local file" in message and "\n" not in message


def test_torchvision_mobilenet_v2_weights_fit_timm_mobilenetv2_100(tmp_path):
    """The quality benchmark's offline MobileNetV2 (torchvision's feature layers) is timm's mobilenetv2_100: the
    same tensors by order and shape, and its bn2 grid equals torchvision's `features` exactly."""
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v2().eval()
    features = {k: v for k, v in source.state_dict().items() if k.startswith("features.")}
    torch.save(remap_by_order(features, "timm/mobilenetv2_100"), tmp_path / "timm_mnv2.pth")
    torch.save(features, tmp_path / "tv_mnv2.pth")
    timm_encoder = HookedEncoder("timm/mobilenetv2_100", "bn2", weights=str(tmp_path / "timm_mnv2.pth"), image_size=64)
    tv_encoder = HookedEncoder("mobilenet_v2", "features", weights=str(tmp_path / "tv_mnv2.pth"), image_size=64)
    assert timm_encoder.preprocess == tv_encoder.preprocess  # ImageNet mean and std, bicubic
    images = _images(64)
    with torch.no_grad():
        assert torch.equal(timm_encoder(images), tv_encoder(images))
