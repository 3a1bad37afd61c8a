"""Where a backbone comes from: torchvision, timm or open_clip. Each source is a small adapter that builds the
model, says how its weights want images normalised and how its token outputs are laid out; the one
HookedEncoder (encoder.py) does the rest the same way for all three.

    source, name = parse_arch("timm/convnext_tiny")          # TIMM, "convnext_tiny"; "resnet152" is torchvision's
    model = source.build(name, weights=None, image_size=224)  # random init; a tag or a file loads weights
    source.preprocess(model)                                  # Preprocess(mean, std, interpolation) of the weights
    source.token_layout(model, "blocks.11")                   # TokenLayout(prefix_tokens=1, ...)
    source.default_layer(model)                               # "blocks.11": hooked when encoder.layer is unset

encoder.weights is the library's own weights name (torchvision enum IMAGENET1K_V2, timm tag fb_in22k_ft_in1k,
open_clip tag laion2b_s34b_b88k; downloaded by the library into its own cache where the network allows) or a
local .safetensors/.pth/.bin file; null builds random weights. timm and open_clip are optional extras, imported
only when an arch names them.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass

import torch.nn as nn
import torchvision

from captioner.config import INTERPOLATIONS
from captioner.errors import CaptionerError, first_line
from captioner.progress import quiet_library_logs
from captioner.model.backbone_weights import load_state, looks_like_file, read_encoder_weights
from captioner.model.pretrained import hub_files, library_download, torchvision_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images are normalised for the weights: (x / 255 - mean) / std per channel, after a resize to
    image_size x image_size with this interpolation."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class TokenLayout:
    """How the hooked module's output is laid out, beyond a plain (B, C, H, W) grid."""
    prefix_tokens: int = 0  # class, register or distillation tokens before the patch tokens of (B, N, C) outputs
    sequence_first: bool = False  # (N, B, C) tokens (open_clip towers built with batch_first=False)
    channels_last: bool = False  # 4-D outputs are (B, H, W, C) (timm's Swin family)



def _require(module: str, extra: str, arch: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CaptionerError(f"encoder.arch {arch} needs the {module} package: pip install \"captioner[{extra}]\"") \
            from None


def _close(name: str, names: list[str]) -> str:
    return ", ".join(difflib.get_close_matches(name, names, n=4, cutoff=0.5)) or "none"


class Torchvision:
    name, extra = "torchvision", None

    def names(self) -> list[str]:
        return sorted(torchvision.models.list_models(module=torchvision.models))

    def check_name(self, name: str, arch: str) -> None:
        if name not in self.names():
            raise CaptionerError(f"unknown encoder.arch '{arch}'; close matches: {_close(name, self.names())}; "
                                 f"e.g. resnet50, resnet152, mobilenet_v2, timm/convnext_tiny, open_clip/ViT-B-16")

    def build(self, name: str, weights: str | None, image_size: int, layer: str | None = None) -> nn.Module:
        self.check_name(name, name)
        state = self._weights(name, weights) if weights else None  # fail before building anything
        model = torchvision.models.get_model(name, weights=None)
        if state is not None:
            load_state(model, state, name, weights, layer)
        return model

    def _weights(self, name: str, weights: str) -> dict:
        """A state_dict from a local file or a cached (else downloaded) torchvision weight enum."""
        if looks_like_file(weights):
            return read_encoder_weights(weights)
        try:
            enum = torchvision.models.get_model_weights(name)
        except ValueError:
            raise CaptionerError(f"no torchvision weights known for arch '{name}'") from None
        names = [w.name for w in enum]
        if weights not in names:
            raise CaptionerError(f"encoder.weights '{weights}' is not a {name} weight name or an existing file; "
                                 f"valid names: {', '.join(names)}, or a path to a .pth/.safetensors file")
        return torchvision_state(name, enum[weights])  # the library's cached, hash-checked loader

    def preprocess(self, model: nn.Module) -> Preprocess:
        return Preprocess()  # every torchvision classification weight is ImageNet-normalised

    def token_layout(self, model: nn.Module, layer: str) -> TokenLayout:
        # vit_b_16's class token; Swin's stages (features, its default layer) emit (B, H, W, C)
        swin = type(model).__name__ == "SwinTransformer" and layer.split(".")[0] == "features"
        return TokenLayout(prefix_tokens=1 if hasattr(model, "class_token") else 0, channels_last=swin)

    def default_layer(self, model: nn.Module) -> str:
        """The last feature stage: layer4 (ResNets, the design's default), trunk_output (RegNets), features (VGG,
        MobileNet, EfficientNet, DenseNet, ConvNeXt), a ViT's last encoder block; else the last top-level module
        before the pooling head (GoogLeNet's inception5b)."""
        children = dict(model.named_children())
        for name in ("layer4", "trunk_output", "features"):
            if name in children:
                return name
        blocks = getattr(getattr(model, "encoder", None), "layers", None)
        if isinstance(blocks, nn.Sequential) and len(blocks):  # vit_b_16: encoder.layers.encoder_layer_11
            return f"encoder.layers.{list(dict(blocks.named_children()))[-1]}"
        stage = None
        for name, child in children.items():
            if isinstance(child, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d)):
                return stage or _no_default(self.name, model)
            if not name.startswith("aux") and not isinstance(child, nn.Dropout):  # auxiliary heads: training only
                stage = name
        return _no_default(self.name, model)


class Timm:
    name, extra = "timm", "timm"

    def names(self) -> list[str]:
        return _require("timm", "timm", "timm/...").list_models()

    def check_name(self, name: str, arch: str) -> None:
        timm = _require("timm", "timm", arch)
        if name in timm.list_models():
            return
        base, dot, tag = name.partition(".")
        if dot and base in timm.list_models():
            raise CaptionerError(f"encoder.arch takes the model name without its weights tag: use "
                                 f"encoder.arch=timm/{base} encoder.weights={tag}")
        raise CaptionerError(f"unknown encoder.arch '{arch}'; close matches: "
                             f"{', '.join('timm/' + n for n in difflib.get_close_matches(name, self.names(), n=4))}"
                             f" (any timm.list_models() name)")

    def tags(self, name: str) -> list[str]:
        timm = _require("timm", "timm", f"timm/{name}")
        return [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*")]

    def build(self, name: str, weights: str | None, image_size: int, layer: str | None = None) -> nn.Module:
        timm = _require("timm", "timm", f"timm/{name}")
        self.check_name(name, f"timm/{name}")
        file = weights if weights and looks_like_file(weights) else None
        tag = weights if weights and not file else None
        if tag and tag not in self.tags(name):
            raise CaptionerError(f"encoder.weights '{tag}' is not a timm weights tag of {name} or an existing file; "
                                 f"valid tags: {', '.join(self.tags(name)) or 'none'}, or a .safetensors/.pth file")
        state = read_encoder_weights(file) if file else None  # fail before building anything
        full = f"{name}.{tag}" if tag else name
        kwargs = {"num_classes": 0}  # no classifier: never computed behind the hook
        cfg = timm.models.get_pretrained_cfg(full)
        if cfg is not None and cfg.fixed_input_size:  # ViTs size their position embedding at build time
            kwargs["img_size"] = image_size
        if tag:
            timm.models.set_pretrained_check_hash(True)  # timm's URL-hosted weights: torch.hub's hash check
            with library_download(f"timm/{name}", tag, hub_files("timm", cfg.to_dict() if cfg else None)), \
                    quiet_library_logs():
                model = timm.create_model(full, pretrained=True, **kwargs)
        else:
            try:
                with quiet_library_logs():
                    model = timm.create_model(full, **kwargs)
            except Exception as e:  # noqa: BLE001 - a size the model cannot take fails in many ways
                raise CaptionerError(f"timm cannot build {name} at {image_size}x{image_size}: "
                                     f"{first_line(e, 160)}") from None
        if state is not None:
            load_state(model, self._as_timm(model, state, file), f"timm/{name}", file, layer)
        return model

    def _as_timm(self, model: nn.Module, state: dict, file: str) -> dict:
        """A file's state_dict in the model's own layout: timm's per-model filter converts original (JAX, OpenAI,
        ...) layouts and resamples position embeddings to image_size; the classifier (num_classes=0) is dropped."""
        module = sys.modules.get(type(model).__module__)
        convert = getattr(module, "checkpoint_filter_fn", None)
        if convert is not None:
            try:
                state = convert(state, model)
            except Exception as e:  # noqa: BLE001 - a file of another model fails inside the filter
                raise CaptionerError(f"encoder weights {file} do not fit timm/{model.pretrained_cfg['architecture']}:"
                                     f" {first_line(e, 160)}") from None
        classifiers = model.pretrained_cfg.get("classifier") or ()
        for head in (classifiers,) if isinstance(classifiers, str) else classifiers:
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        return state

    def preprocess(self, model: nn.Module) -> Preprocess:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return Preprocess(tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                          _interpolation(cfg.get("interpolation")))

    def token_layout(self, model: nn.Module, layer: str) -> TokenLayout:
        return TokenLayout(prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
                           channels_last=getattr(model, "output_fmt", "NCHW") == "NHWC")

    def default_layer(self, model: nn.Module) -> str:
        """The module of the last entry of timm's own feature_info (what features_only=True would return last):
        layer4 of a ResNet, stages.3 of a ConvNeXt, blocks.11 of a ViT-B."""
        info = getattr(model, "feature_info", None) or []
        module = info[-1].get("module") if isinstance(info, list) and isinstance(info[-1], dict) else None
        return module or _no_default(self.name, model)


class OpenClip:
    name, extra = "open_clip", "clip"

    def names(self) -> list[str]:
        return _require("open_clip", "clip", "open_clip/...").list_models()

    def check_name(self, name: str, arch: str) -> None:
        if name not in self.names():
            raise CaptionerError(f"unknown encoder.arch '{arch}'; close matches: "
                                 f"{', '.join('open_clip/' + n for n in difflib.get_close_matches(name, self.names(), n=4))}"
                                 f" (any open_clip.list_models() name)")

    def build(self, name: str, weights: str | None, image_size: int, layer: str | None = None) -> nn.Module:
        """The visual tower of open_clip model name (its text tower is dropped)."""
        open_clip = _require("open_clip", "clip", f"open_clip/{name}")
        self.check_name(name, f"open_clip/{name}")
        file = weights if weights and looks_like_file(weights) else None
        tag = weights if weights and not file else None
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag and tag not in tags:
            raise CaptionerError(f"encoder.weights '{tag}' is not an open_clip tag of {name} or an existing file; "
                                 f"valid tags: {', '.join(tags) or 'none'}, or an open_clip_pytorch_model.bin file")
        if tag:
            self._check_activation(open_clip, name, tag)
        state = read_encoder_weights(file) if file else None
        if tag:
            with library_download(f"open_clip/{name}", tag, hub_files("open_clip", open_clip.get_pretrained_cfg(
                    name, tag))), quiet_library_logs():
                clip = open_clip.create_model(name, pretrained=tag, force_image_size=image_size)
        else:
            try:
                with quiet_library_logs():
                    clip = open_clip.create_model(name, force_image_size=image_size)
            except Exception as e:  # noqa: BLE001 - a size the model cannot take fails in many ways
                raise CaptionerError(f"open_clip cannot build {name} at {image_size}x{image_size}: "
                                     f"{first_line(e, 160)}") from None
        if state is not None:
            if not any(k.startswith("visual.") for k in state):  # a visual tower saved on its own
                state = {"visual." + k: v for k, v in state.items()}
            state = {k: v for k, v in state.items() if k.startswith("visual.")}
            open_clip.model.resize_pos_embed(state, clip)  # to image_size's grid, in place
            state = {k[len("visual."):]: v for k, v in state.items()}
            load_state(clip.visual, state, f"open_clip/{name}", file, layer)
        return clip.visual

    def _check_activation(self, open_clip, name: str, tag: str) -> None:
        """Weights trained with QuickGELU need the -quickgelu model (and the reverse): the activation is part of
        the architecture that a checkpoint rebuilds from encoder.arch alone, without the tag."""
        wanted = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
        built = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
        if wanted != built:
            other = name + "-quickgelu" if wanted else name.removesuffix("-quickgelu")
            raise CaptionerError(f"open_clip's {tag} weights for {name} were trained "
                                 f"{'with' if wanted else 'without'} QuickGELU: use encoder.arch=open_clip/{other}")

    def preprocess(self, model: nn.Module) -> Preprocess:
        cfg = getattr(model, "preprocess_cfg", None) or {}
        return Preprocess(tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                          _interpolation(cfg.get("interpolation")))

    def token_layout(self, model: nn.Module, layer: str) -> TokenLayout:
        trunk = getattr(model, "trunk", None)  # towers that wrap a timm model
        if trunk is not None:
            return Timm().token_layout(trunk, layer)
        transformer = getattr(model, "transformer", None)
        sequence_first = not getattr(transformer, "batch_first", True) and layer.startswith("transformer.")
        return TokenLayout(prefix_tokens=1 if hasattr(model, "class_embedding") else 0, sequence_first=sequence_first)

    def default_layer(self, model: nn.Module) -> str:
        """A ViT tower's last transformer block (transformer.resblocks.N-1), a ModifiedResNet's layer4, or the
        last feature_info stage of a tower wrapping a timm model (trunk.stages.3)."""
        blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return f"transformer.resblocks.{len(blocks) - 1}"
        if hasattr(model, "layer4"):
            return "layer4"
        trunk = getattr(model, "trunk", None)
        if trunk is not None:
            return "trunk." + Timm().default_layer(trunk)
        return _no_default(self.name, model)


def _no_default(library: str, model: nn.Module) -> str:
    raise CaptionerError(f"{library} reports no last feature stage for {type(model).__name__}: set encoder.layer to "
                         f"the module to hook; run `captioner layers ARCH` to list them")


def _interpolation(value) -> str:
    return value if value in INTERPOLATIONS else "bicubic"  # timm's "random" is a training-time augmentation


SOURCES = {"torchvision": Torchvision(), "timm": Timm(), "open_clip": OpenClip()}


def parse_arch(arch: str) -> tuple[Torchvision | Timm | OpenClip, str]:
    """'timm/convnext_tiny' -> (the timm source, 'convnext_tiny'); a bare name is torchvision's."""
    prefix, slash, name = arch.partition("/")
    if not slash:
        return SOURCES["torchvision"], arch
    if prefix not in SOURCES or not name:
        raise CaptionerError(f"encoder.arch '{arch}': the part before '/' must be one of {', '.join(SOURCES)} "
                             f"(e.g. timm/convnext_tiny, open_clip/ViT-B-16), or give a torchvision name alone")
    return SOURCES[prefix], name
