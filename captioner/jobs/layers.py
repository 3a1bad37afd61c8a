"""List the modules of a backbone that `encoder.layer` can hook, with the shape each one outputs and the grid
hooking it gives.

    captioner layers resnet152 --image-size 448              # layer4: 2048x14x14, layer3.35: 1024x28x28, ...
    captioner layers timm/vit_base_patch16_224               # blocks.11: 197x768 tokens -> a 768x14x14 grid
"""
from __future__ import annotations

from dataclasses import dataclass

from captioner.config import require_min
from captioner.model.encoder import LayerInfo, list_layers


@dataclass
class LayersJob:
    """`captioner layers`'s options."""
    arch: str  # a backbone name: resnet152, timm/convnext_tiny, open_clip/ViT-B-16
    image_size: int = 224
    in_channels: int = 3

    def __post_init__(self):
        require_min(("--image-size", self.image_size, 1), ("--in-channels", self.in_channels, 1))


def main(job: LayersJob) -> list[LayerInfo]:
    """(name, module type, output shape without the batch, grid it gives) for every module a forward pass calls,
    in order."""
    return list_layers(job.arch, job.image_size, job.in_channels)


def format_rows(rows: list[LayerInfo]) -> list[str]:
    def dims(shape) -> str:
        return "x".join(map(str, shape)) if shape is not None else "-"
    header = f"{'module':<32} {'type':<22} {'output':<14} grid (encoder.layer gives)"
    return [header, *(f"{r.name:<32} {r.kind:<22} {dims(r.shape):<14} {dims(r.grid)}"
                      f"{'   <- default (encoder.layer unset)' if r.default else ''}" for r in rows)]
