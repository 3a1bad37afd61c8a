"""List the modules of a backbone that `encoder.layer` can hook, with the shape each one outputs.

    captioner layers resnet152 --image-size 448        # layer4: 2048x14x14, layer3.35: 1024x28x28, ...
"""
from __future__ import annotations

from dataclasses import dataclass

from captioner.config import require_min
from captioner.model.encoder import list_layers


@dataclass
class LayersJob:
    """`captioner layers`'s options."""
    arch: str  # a backbone name, e.g. resnet152
    image_size: int = 224
    in_channels: int = 3

    def __post_init__(self):
        require_min(("--image-size", self.image_size, 1), ("--in-channels", self.in_channels, 1))


def main(job: LayersJob) -> list[tuple[str, str, tuple]]:
    """(name, module type, output shape without the batch) for every module a forward pass calls, in order."""
    return list_layers(job.arch, job.image_size, job.in_channels)


def format_rows(rows: list[tuple[str, str, tuple]]) -> list[str]:
    return [f"{name:<28} {kind:<20} {'x'.join(map(str, shape))}" for name, kind, shape in rows]
