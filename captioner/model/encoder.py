"""A frozen backbone whose chosen module's output is taken through a forward hook, as a (C, H, W) grid.

    enc = HookedEncoder("resnet152", "layer4", weights=None, image_size=224)   # layer None: the last stage
    feats = enc(images_uint8)          # (B, 3, 224, 224) uint8 -> (B, 2048, 7, 7) float
    enc.channels, enc.grid, enc.reduction   # 2048, (7, 7), 32
    HookedEncoder("timm/vit_tiny_patch16_224", "blocks.11")          # (B, 197, 192) tokens -> (B, 192, 14, 14)
    HookedEncoder("open_clip/ViT-B-16", "transformer.resblocks.11", weights="openai")

The backbone comes from torchvision, timm or open_clip (backbones.py builds it); the mechanism is the same
for all: the forward pass stops right after the hooked module, so nothing behind it (pooling, heads, later
blocks) is computed. A hooked module emitting tokens (B, N, C) loses its prefix tokens (class, registers) and
the rest is reshaped to the model's patch grid (B, C, H, W), row by row as the patches were cut, so attention
maps line up with the image. Normalisation lives here too, with the weights' own mean and std (or the config's),
so the data pipeline only resizes.

finetune_from="layer4" makes the modules from layer4 up to the hooked one trainable (their BatchNorm
follows train()/eval()); everything before stays frozen in eval mode.
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from captioner.errors import CaptionerError, first_line
from captioner.model.backbones import INTERPOLATIONS, Preprocess, TokenLayout, parse_arch
from captioner.model.backbone_weights import after_layer, remap_onto, strip_wrapper_prefixes  # noqa: F401

log = logging.getLogger("captioner")

__all__ = ["HookedEncoder", "build_backbone", "list_layers", "remap_by_order", "strip_wrapper_prefixes", "to_grid"]


class _StopForward(Exception):
    """Raised by the hook to skip every layer after the hooked one."""


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise CaptionerError("the backbone has no Conv2d to adapt to encoder.in_channels")


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the stem conv (a CNN's first conv, a ViT's patch embedding) with one taking in_channels, each new
    filter slice the mean of the RGB ones."""
    name, old = _first_conv(model)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None)
    with torch.no_grad():
        # Scaled by 3/in_channels so a uniform image gives the same response as it did through RGB.
        mean = old.weight.mean(dim=1, keepdim=True)  # (64, 1, 7, 7)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def build_backbone(arch: str, weights: str | None = None, in_channels: int = 3, layer: str | None = None,
                   image_size: int = 224) -> nn.Module:
    """The model arch (torchvision name, timm/NAME or open_clip/NAME), with weights (a name or tag, or a file)
    when given. With layer set, a weights file need not hold the modules after that layer (never computed)."""
    source, name = parse_arch(arch)
    model = source.build(name, weights, image_size, layer)
    _check_patches(model, arch, image_size)
    if in_channels != 3:
        _adapt_input_channels(model, in_channels)
    return model


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """A vision transformer's (height, width) patch size as its library records it (timm's and open_clip's
    timm towers' patch_embed.patch_size, open_clip's and torchvision's patch_size); None for a CNN, and for a
    patch embedding that pads the image to whole patches (timm's dynamic_img_pad)."""
    embed = getattr(model, "patch_embed", None) or getattr(getattr(model, "trunk", None), "patch_embed", None)
    if embed is not None and getattr(embed, "dynamic_img_pad", False):
        return None
    size = getattr(embed, "patch_size", None) if embed is not None else getattr(model, "patch_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(n, int) for n in size):
        return int(size[0]), int(size[1])
    return None


def _check_patches(model: nn.Module, arch: str, image_size: int) -> None:
    """Refuse an image_size that the ViT's patch size does not divide: its patch embedding (a convolution with
    stride = patch size) would drop the last rows and columns of pixels without a word."""
    size = patch_size(model)
    if size is None or all(image_size % n == 0 for n in size):
        return
    step = math.lcm(*size)
    below, above = image_size // step * step, (image_size // step + 1) * step
    nearest = " or ".join(str(n) for n in (below, above) if n >= 32)
    raise CaptionerError(f"encoder.image_size {image_size} is not a multiple of {arch}'s patch size "
                         f"{'x'.join(map(str, size)) if size[0] != size[1] else size[0]}: the last "
                         f"{image_size % step} rows and columns of pixels would never be seen; use {nearest}")


def remap_by_order(source: dict, arch: str, prefix: str = "") -> dict:
    """A state_dict saved under other key names -> arch's own names, matched by order and shape (weights.py)."""
    return remap_onto(source, build_backbone(arch).state_dict(), arch, prefix)


def _check_layer(model: nn.Module, arch: str, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    close = difflib.get_close_matches(layer, [n for n in modules if n], n=4, cutoff=0.5)
    raise CaptionerError(f"layer '{layer}' not in {arch}; close matches: {', '.join(close) or 'none'}; "
                         f"run `captioner layers {arch}` for the full list")


def _finetuned_modules(model: nn.Module, arch: str, layer: str, finetune_from: str) -> list[nn.Module]:
    """The modules from finetune_from up to the end of the hooked layer, in definition (= forward) order."""
    try:
        _check_layer(model, arch, finetune_from)
    except CaptionerError as e:
        raise CaptionerError(f"encoder.finetune_from: {e}") from None
    names = [name for name, _ in model.named_modules()]  # parents before children, in definition order
    start = names.index(finetune_from)
    end = max(i for i, name in enumerate(names) if name == layer or name.startswith(layer + "."))
    if start > end:
        raise CaptionerError(f"encoder.finetune_from '{finetune_from}' comes after the hooked layer '{layer}' of "
                             f"{arch}, so nothing would be trained; use '{layer}' or an earlier module")
    modules = dict(model.named_modules())
    return [modules[name] for name in names[start:end + 1]]


def _patch_grid(patches: int, height: int, width: int) -> tuple[int, int] | None:
    """(h, w) with h * w == patches and h / w == height / width (the patch grid keeps the image's shape)."""
    if patches < 1:
        return None
    h = max(1, round(math.sqrt(patches * height / width)))
    w = patches // h
    return (h, w) if h * w == patches and w == max(1, round(h * width / height)) else None


def to_grid(out: torch.Tensor, layout: TokenLayout, image_hw: tuple[int, int]) -> torch.Tensor | None:
    """The hooked module's output as a (B, C, H, W) grid, or None when it is not one.

    (B, C, H, W) stays; (B, H, W, C) (layout.channels_last) is permuted; tokens (B, N, C) (or (N, B, C),
    layout.sequence_first) lose their prefix tokens and the N - prefix patch tokens, in row-major order as the
    patch embedding flattened them, become an h x w grid of the image's aspect."""
    if out.dim() == 4:
        return out.permute(0, 3, 1, 2) if layout.channels_last else out  # (B, H, W, C) -> (B, C, H, W)
    if out.dim() != 3:
        return None
    if layout.sequence_first:
        out = out.transpose(0, 1)  # (N, B, C) -> (B, N, C)
    batch, tokens, channels = out.shape
    # Under torch.onnx's tracer sizes are 0-d tensors; the token count and width are fixed by the image size
    # (fixed in an exported graph), so they become plain ints; batch stays traced (the graph's dynamic axis).
    tokens, channels = int(tokens), int(channels)
    for prefix in dict.fromkeys((layout.prefix_tokens, 0)):  # a block's output, then a patch embedding's
        grid = _patch_grid(tokens - prefix, *image_hw)
        if grid is not None:
            # (B, prefix + h*w, C) -> (B, h*w, C) -> (B, C, h*w) -> (B, C, h, w)
            return out[:, prefix:].transpose(1, 2).reshape(batch, channels, *grid)
    return None


def _resolve_preprocess(own: Preprocess, in_channels: int, mean, std, interpolation) -> Preprocess:
    """The weights' own preprocessing, with the config's mean, std and interpolation where given."""
    if mean is None:
        mean = own.mean if in_channels == 3 else (sum(own.mean) / len(own.mean),) * in_channels
    if std is None:
        std = own.std if in_channels == 3 else (sum(own.std) / len(own.std),) * in_channels
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    for key, values in (("encoder.mean", mean), ("encoder.std", std)):
        if len(values) != in_channels:
            raise CaptionerError(f"{key} has {len(values)} values, one per input channel is needed "
                                 f"(encoder.in_channels={in_channels})")
    if any(v <= 0 for v in std):
        raise CaptionerError(f"encoder.std must be > 0 in every channel, got {list(std)}")
    interpolation = interpolation or own.interpolation
    if interpolation not in INTERPOLATIONS:
        raise CaptionerError(f"encoder.interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{interpolation}'")
    return Preprocess(mean, std, interpolation)


class HookedEncoder(nn.Module):
    """Frozen backbone returning the hooked module's activation as (B, C, H, W) for uint8 or [0, 1] float images."""

    def __init__(self, arch: str = "resnet152", layer: str | None = None, weights: str | None = None,
                 in_channels: int = 3, image_size: int = 224, finetune_from: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, interpolation: str | None = None):
        super().__init__()
        source, _ = parse_arch(arch)
        self.source = source.name
        self.backbone = build_backbone(arch, weights, in_channels, layer or None, image_size)
        # No layer given (None or ""): the last feature stage the library reports (backbones.py default_layer);
        # checkpoints record the name resolved here, so a later library version cannot move an old model's hook.
        defaulted = not layer
        layer = layer or source.default_layer(self.backbone)
        self.arch, self.layer, self.in_channels, self.image_size = arch, layer, in_channels, image_size
        target = _check_layer(self.backbone, arch, layer)
        self.layout = source.token_layout(self.backbone, layer)
        # Preprocessing travels with the model: the weights' own unless the config (a checkpoint's) says otherwise.
        self.preprocess = _resolve_preprocess(source.preprocess(self.backbone), in_channels, mean, std, interpolation)
        # A plain list, not submodules: the same modules stay registered (and saved) under self.backbone.
        self.finetuned = _finetuned_modules(self.backbone, arch, layer, finetune_from) if finetune_from else []
        # A hook is a managed resource: one handle, removed in close(); the capture is dropped when read.
        # A module called several times in one forward (a Bottleneck's shared relu) yields its first call.
        self._captured: torch.Tensor | None = None
        self._handle = target.register_forward_hook(self._hook)
        self.backbone.requires_grad_(False)
        for module in self.finetuned:  # recurse=False: a container's later children (after the hook) stay frozen
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        self.backbone.eval()
        self.register_buffer("mean", torch.tensor(self.preprocess.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.preprocess.std).view(1, -1, 1, 1), persistent=False)
        # Describe itself (timm FeatureInfo): channels and grid come from one small dry run.
        out = _dry_run(self, arch, image_size, in_channels)
        self.channels, self.grid = out.shape[1], (out.shape[2], out.shape[3])
        self.reduction = image_size // out.shape[2]
        if defaulted:
            log.info("encoder.layer not set: hooking %s of %s, the last feature stage %s reports (a %dx%dx%d grid "
                     "at %dx%d; set encoder.layer to choose another: `captioner layers %s`)", layer, arch, self.source,
                     self.channels, *self.grid, image_size, image_size, arch)

    @property
    def interpolation(self) -> str:
        return self.preprocess.interpolation

    def uncomputed_keys(self) -> set[str]:
        """state_dict keys (of this module) of the backbone modules after the hooked layer: never computed, so a
        model folder leaves them out and loading fills them with zeros."""
        return {f"backbone.{key}" for key in after_layer(self.backbone, self.layer)}

    def _hook(self, module, inputs, output):
        if self._captured is None:
            self._captured = output
            raise _StopForward

    def train(self, mode: bool = True):
        # Frozen stays frozen: BatchNorm statistics never move, whatever the parent model's mode.
        super().train(mode)
        self.backbone.eval()
        for module in self.finetuned:  # only the fine-tuned stages follow the mode
            module.training = mode
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return (images - self.mean) / self.std

    def grid_of(self, captured, image_hw: tuple[int, int]) -> torch.Tensor:
        """The hooked module's raw output -> (B, C, H, W); a CaptionerError when it is not a grid."""
        grid = to_grid(captured, self.layout, image_hw) if isinstance(captured, torch.Tensor) else None
        if grid is None:
            shape = tuple(captured.shape[1:]) if isinstance(captured, torch.Tensor) else type(captured).__name__
            raise CaptionerError(f"layer '{self.layer}' of {self.arch} gives {shape} per image, not a (channels, "
                                 f"height, width) feature map or the tokens of a patch grid: attention needs a grid "
                                 f"of regions; hook a convolutional stage or a transformer block; run "
                                 f"`captioner layers {self.arch}`")
        return grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) uint8 or float in [0, 1] -> (B, C, H/r, W/r) float activation."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise CaptionerError(f"encoder expects (B, {self.in_channels}, H, W) images, got {tuple(images.shape)}")
        x = self.normalize(images)
        self._captured = None
        # Grad only when fine-tuning; even then the frozen stages before the first trainable one record no graph.
        with torch.set_grad_enabled(bool(self.finetuned) and torch.is_grad_enabled()):
            try:
                self.backbone(x)
            except _StopForward:
                pass
        out, self._captured = self._captured, None
        if out is None:
            raise CaptionerError(f"layer '{self.layer}' of {self.arch} produced no output (never called)")
        return self.grid_of(out, (images.shape[2], images.shape[3]))

    def plain_backbone(self) -> nn.Module:
        """A copy of the backbone without the stop-forward hook, for tracers and exporters, which cannot follow
        an exception (model/truncated.py cuts it after the hooked layer instead)."""
        was_open = self._handle is not None
        self.close()
        try:
            return copy.deepcopy(self.backbone)
        finally:
            if was_open:
                self._handle = _check_layer(self.backbone, self.arch, self.layer).register_forward_hook(self._hook)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dry_run(model: nn.Module, arch: str, image_size: int, in_channels: int) -> torch.Tensor:
    """model's output for one blank image; a CaptionerError when arch cannot take this size or channels."""
    try:
        with torch.no_grad():
            return model(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as e:  # torchvision and timm check sizes with assertions
        reason = first_line(e, 160)
        raise CaptionerError(f"{arch} cannot run on {in_channels}x{image_size}x{image_size} images ({reason}); "
                             f"try another image size (224 suits most models)") from None


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # the module's class name
    shape: tuple  # its output shape without the batch dimension, as the module emits it
    grid: tuple | None  # (C, H, W) that hooking it gives (tokens reshaped), None when it is not a grid
    default: bool = False  # the layer hooked when encoder.layer is unset (the library's last feature stage)


def list_layers(arch: str, image_size: int = 224, in_channels: int = 3) -> list[LayerInfo]:
    """Every module a forward pass calls, in order, with its output shape and the grid hooking it gives."""
    if image_size < 1 or in_channels < 1:
        raise CaptionerError(f"--image-size and --in-channels must be >= 1, got {image_size} and {in_channels}")
    source, _ = parse_arch(arch)
    model = build_backbone(arch, None, in_channels, image_size=image_size).eval()
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            if name not in outputs and isinstance(out, torch.Tensor):
                outputs[name] = out

        handles.append(module.register_forward_hook(hook))
    try:
        _dry_run(model, arch, image_size, in_channels)
    finally:
        for h in handles:
            h.remove()
    try:
        default = source.default_layer(model)
    except CaptionerError:  # no stage the library reports: every layer is still listed
        default = None
    infos = []
    for name, module in model.named_modules():
        if name in outputs:
            grid = to_grid(outputs[name], source.token_layout(model, name), (image_size, image_size))
            infos.append(LayerInfo(name, type(module).__name__, tuple(outputs[name].shape[1:]),
                                   tuple(grid.shape[1:]) if grid is not None else None, name == default))
    return infos
