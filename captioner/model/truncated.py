"""The hooked encoder as a plain forward that stops after the hooked layer, for tracers and exporters.

    enc = HookedEncoder("resnet152", "layer4")
    cut = TruncatedEncoder(enc)              # the same numbers as enc(images); no hook, no exception
    cut(images_uint8)                        # (B, 3, S, S) uint8 -> (B, C, H, W) float, normalisation inside

HookedEncoder stops its forward pass by raising from a forward hook (the product's design: nothing after the
hooked layer runs). Tracers (torch.onnx, torch.export) cannot follow an exception, so export traces this
instead: torchvision's FX feature extractor (timm's, for timm backbones, which knows timm's leaf modules)
rewrites the backbone's forward as a graph that ends at the hooked module's output, with everything behind
it dropped. tests/test_onnx.py checks that it equals the hooked encoder. A module called several times in one
forward (a Bottleneck's shared relu) gives its first call, as the hook does.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from captioner.errors import CaptionerError, first_line


def _feature_extractor(backbone: nn.Module, node: str, arch: str) -> nn.Module:
    """backbone's forward as an FX graph module returning {"out": node's output}."""
    from torchvision.models.feature_extraction import create_feature_extractor
    first_error = None
    try:
        return create_feature_extractor(backbone, return_nodes={node: "out"})
    except Exception as e:  # noqa: BLE001 - any tracing failure: try timm's tracer, then one line
        first_error = e
    try:
        from timm.models._features_fx import create_feature_extractor as timm_extractor
    except ImportError:
        timm_extractor = None
    if timm_extractor is not None:
        try:
            return timm_extractor(backbone, return_nodes={node: "out"})
        except Exception:  # noqa: BLE001
            pass
    reason = first_line(first_error)
    raise CaptionerError(f"cannot cut {arch} after '{node}' for export (its forward cannot be traced: {reason}); "
                         f"the PyTorch runtime still works with it") from None


class TruncatedEncoder(nn.Module):
    """(B, in_channels, S, S) uint8 (or [0, 1] float) images -> the hooked layer's (B, C, H, W) grid, computed
    by a forward that ends at the hooked layer. The encoder's weights are copied: later changes to it do not
    show here."""

    def __init__(self, encoder):
        super().__init__()
        self.arch, self.layer = encoder.arch, encoder.layer
        self.trunk = _feature_extractor(encoder.plain_backbone().eval(), encoder.layer, encoder.arch)
        self.register_buffer("mean", encoder.mean.detach().clone(), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("std", encoder.std.detach().clone(), persistent=False)
        # Token outputs (transformer backbones) become the grid the hooked encoder gives: its own rule.
        self._to_grid = getattr(encoder, "grid_of", None)
        # The image size as static ints, not the traced input's shape: an exported graph fixes it anyway.
        self.image_hw = (encoder.image_size, encoder.image_size)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        x = (x - self.mean) / self.std  # as HookedEncoder.normalize
        out = self.trunk(x)["out"]
        if self._to_grid is not None:
            out = self._to_grid(out, self.image_hw)
        return out  # (B, C, H, W)
