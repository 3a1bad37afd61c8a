"""A frozen torchvision CNN whose chosen module's output is taken through a forward hook.

    enc = HookedEncoder("resnet152", "layer4", weights=None, image_size=224)
    feats = enc(images_uint8)          # (B, 3, 224, 224) uint8 -> (B, 2048, 7, 7) float
    enc.channels, enc.grid, enc.reduction   # 2048, (7, 7), 32

The forward pass stops right after the hooked module: nothing behind it (avgpool, fc, or layer4 when
hooking layer3) is computed. Normalisation lives here too, so the data pipeline only resizes.

finetune_from="layer4" makes the modules from layer4 up to the hooked one trainable (their BatchNorm
follows train()/eval()); everything before stays frozen in eval mode.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from captioner.errors import CaptionerError
from captioner.files import move_into_place
from captioner.weights import WEIGHT_SUFFIXES, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _StopForward(Exception):
    """Raised by the hook to skip every layer after the hooked one."""


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def strip_wrapper_prefixes(state: dict) -> dict:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _weights_state_dict(arch: str, weights: str) -> dict:
    """A state_dict from a local .safetensors/.pth/.pt/.bin file or a cached torchvision weight enum; never runs
    pickled code (captioner/weights.py reads every weights file)."""
    looks_like_path = weights.endswith(WEIGHT_SUFFIXES) or os.sep in weights or Path(weights).exists()
    if looks_like_path:
        return strip_wrapper_prefixes(read_state_dict(weights, "encoder weights file"))
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise CaptionerError(f"no torchvision weights known for arch '{arch}'") from None
    names = [w.name for w in enum]
    if weights not in names:
        raise CaptionerError(f"encoder.weights '{weights}' is not a {arch} weight name or an existing file; "
                             f"valid names: {', '.join(names)}, or a path to a .pth or .safetensors file")
    url = enum[weights].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        try:
            torch.hub.download_url_to_file(url, str(cached.with_suffix(".part")), progress=True)
            move_into_place(cached.with_suffix(".part"), cached)
        except Exception as e:  # noqa: BLE001 - offline machines fail in many ways; all mean the same
            raise CaptionerError(f"{arch} {weights} weights are not cached at {cached} and could not be downloaded "
                                 f"({type(e).__name__}); download {url} to that path, or set encoder.weights to a "
                                 f"local .pth or .safetensors file") from None
    return read_state_dict(cached, f"{arch} {weights} weights file")


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise CaptionerError("the backbone has no Conv2d to adapt to encoder.in_channels")


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the stem conv with one taking in_channels, each new filter slice the mean of the RGB ones."""
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


def remap_by_order(source: dict, arch: str, prefix: str = "") -> dict:
    """A state_dict saved under other key names -> arch's own names, matched by order and shape.

    source's tensors, in their saved order, fill arch's state_dict keys that start with prefix (e.g. "features."
    for a MobileNetV2 saved without its classifier), in definition order; any count or shape mismatch is an error.
    """
    template = torchvision.models.get_model(arch, weights=None).state_dict()
    targets = [k for k in template if k.startswith(prefix)]
    if len(targets) != len(source):
        raise CaptionerError(f"{len(source)} saved tensors cannot fill the {len(targets)} tensors of {arch} "
                             f"under '{prefix}'")
    out = {}
    for (name, tensor), target in zip(source.items(), targets):
        if tuple(tensor.shape) != tuple(template[target].shape):
            raise CaptionerError(f"saved tensor {name} {tuple(tensor.shape)} does not fit {arch}'s {target} "
                                 f"{tuple(template[target].shape)}")
        out[target] = tensor
    return out


def _after_layer(model: nn.Module, layer: str) -> set[str]:
    """Parameter and buffer names of the modules defined after the hooked layer: never computed."""
    names = [name for name, _ in model.named_modules()]  # definition (= forward) order, parents first
    if not layer or layer not in names:
        return set()
    end = max(i for i, name in enumerate(names) if name == layer or name.startswith(layer + "."))
    later = set(names[end + 1:])
    return {key for key in model.state_dict() if key.rpartition(".")[0] in later}


def _load_weights(model: nn.Module, state: dict, arch: str, weights: str, layer: str | None) -> None:
    """Load state into model; weights may lack the modules after the hooked layer (a backbone saved without
    its classifier head): they are never computed, so they keep their random init."""
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    uncomputed = _after_layer(model, layer) if layer else set()
    needed = [k for k in missing if k not in uncomputed]
    if needed or unexpected:
        what = (f"missing keys {', '.join(needed[:3])}" if needed else "") + ("; " if needed and unexpected else "") \
            + (f"unexpected keys {', '.join(unexpected[:3])}" if unexpected else "")
        raise CaptionerError(f"encoder weights {weights} do not fit {arch}: {what}")
    # Zeros, not the random init, for the layers the file lacks: the same encoder whatever the seed, so a feature
    # cache's weights fingerprint still matches it.
    template = model.state_dict()
    state = {**{k: torch.zeros_like(template[k]) for k in missing}, **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CaptionerError(f"encoder weights {weights} do not fit {arch}: {first}") from None


def build_backbone(arch: str, weights: str | None = None, in_channels: int = 3, layer: str | None = None) -> nn.Module:
    """The torchvision model arch, with weights (a name or .pth path) when given. With layer set, weights need not
    hold the modules after that layer (never computed behind the hook)."""
    archs = available_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=4)
        raise CaptionerError(f"unknown encoder.arch '{arch}'; close matches: {', '.join(close) or 'none'}; "
                             f"e.g. resnet18, resnet50, resnet101, resnet152, mobilenet_v2")
    state = _weights_state_dict(arch, weights) if weights else None  # fail before building anything
    model = torchvision.models.get_model(arch, weights=None)
    if state is not None:
        _load_weights(model, state, arch, weights, layer)
    if in_channels != 3:
        _adapt_input_channels(model, in_channels)
    return model


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


class HookedEncoder(nn.Module):
    """Frozen CNN returning the hooked module's activation (B, C, H, W) for uint8 or [0, 1] float images."""

    def __init__(self, arch: str = "resnet152", layer: str = "layer4", weights: str | None = None,
                 in_channels: int = 3, image_size: int = 224, finetune_from: str | None = None):
        super().__init__()
        self.arch, self.layer, self.in_channels, self.image_size = arch, layer, in_channels, image_size
        self.backbone = build_backbone(arch, weights, in_channels, layer)
        target = _check_layer(self.backbone, arch, layer)
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
        mean = IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,) * in_channels
        std = IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,) * in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # Describe itself (timm FeatureInfo): channels and grid come from one small dry run.
        out = _dry_run(self, arch, image_size, in_channels)
        if out.dim() != 4:
            raise CaptionerError(f"layer '{layer}' of {arch} gives {tuple(out.shape[1:])} per image, not a (channels, "
                                 f"height, width) feature map: attention needs a grid of regions; hook a "
                                 f"convolutional stage (e.g. layer4 of a ResNet); run `captioner layers {arch}`")
        self.channels, self.grid = out.shape[1], (out.shape[2], out.shape[3])
        self.reduction = image_size // out.shape[2]

    def uncomputed_keys(self) -> set[str]:
        """state_dict keys (of this module) of the backbone modules after the hooked layer: never computed, so a
        model folder leaves them out and loading fills them with zeros."""
        return {f"backbone.{key}" for key in _after_layer(self.backbone, self.layer)}

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
        if not isinstance(out, torch.Tensor):
            raise CaptionerError(f"layer '{self.layer}' of {self.arch} produced no tensor output")
        return out

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
    except (RuntimeError, AssertionError, ValueError) as e:  # torchvision checks sizes with torch._assert
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CaptionerError(f"{arch} cannot run on {in_channels}x{image_size}x{image_size} images ({reason}); "
                             f"try another image size (224 suits every torchvision CNN)") from None


def list_layers(arch: str, image_size: int = 224, in_channels: int = 3) -> list[tuple[str, str, tuple]]:
    """(name, module type, output shape without batch) for every module a forward pass calls, in order."""
    if image_size < 1 or in_channels < 1:
        raise CaptionerError(f"--image-size and --in-channels must be >= 1, got {image_size} and {in_channels}")
    model = build_backbone(arch, None, in_channels).eval()
    shapes: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            if name not in shapes and isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape[1:])

        handles.append(module.register_forward_hook(hook))
    try:
        _dry_run(model, arch, image_size, in_channels)
    finally:
        for h in handles:
            h.remove()
    return [(n, type(m).__name__, shapes[n]) for n, m in model.named_modules() if n in shapes]
