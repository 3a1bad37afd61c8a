"""captioner: attention LSTM image captioning on a frozen, hooked torchvision CNN.

    from captioner import Captioner
    cap = Captioner.from_pretrained("runs/tiny/best.pt")      # a checkpoint, a model folder or a Hub repo id
    cap.caption("photo.jpg").text                              # paths, PIL images, numpy arrays, tensors

`Captioner` and `Caption` are imported on first use, so `import captioner` (and `captioner --help`) stays
instant and does not load torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from captioner.errors import CaptionerError, CaptionerFileError

__version__ = "0.2.0"
__all__ = ["Caption", "Captioner", "CaptionerError", "CaptionerFileError", "__version__"]

if TYPE_CHECKING:  # type checkers see the names; at run time __getattr__ imports them on first use
    from captioner.api import Caption, Captioner


def __getattr__(name: str):
    if name in ("Caption", "Captioner"):
        from captioner import api
        return getattr(api, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
