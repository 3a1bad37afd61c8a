"""The one conversion rule: pixels of any type -> the 8-bit RGB image the model reads.

Every input meets this rule whichever way it comes (a file decoded by Pillow, a PIL image, a numpy array, a torch
tensor), so the same pixels give the same model input, and the same caption:

    bool                      (PIL mode 1)           False black, True white
    uint8                     (PIL L, LA, RGB, ...)  0..255, as they are
    uint16, int16, int32      (PIL I;16, I)          16-bit values, 0..65535, shown as viewers show them (/ 257)
    float16/32/64, bfloat16   (PIL F)                0..1 (x 255, rounded: a uint8 image / 255 comes back exactly)

A value outside its type's range, NaN and infinity are refused (one line naming the item and the values found),
never clipped or stretched: a stretch makes every pixel depend on the brightest one (a mode-F image and the
same array would differ), a clip hides a scale mistake (floats holding 0..255). Other types (int8, int64,
uint32/64, complex, text) are refused with what to convert to: an int64 array is most often a 0..255 image
made with np.array(list), which the 16-bit rule would show black.

Shapes: arrays HxW, HxWx1, HxWx2 (grey + alpha), HxWx3 (RGB), HxWx4 (RGBA), channels last; tensors (C, H, W)
with C in 1..4 (channels first, torch's habit), else (H, W, C) or (H, W). Alpha is flattened onto white.
PIL images in 8-bit modes (P, CMYK, YCbCr, LAB, ...) are converted by Pillow; the other modes go through the
array rule above.

    rgb_image(pixels_of(tensor, "images[3]"), "images[3]")   # -> an RGB PIL image, or a one-line CaptionerError
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from captioner.errors import CaptionerError

# PIL modes whose pixels are not 8-bit: they go through the array rule, as their np.asarray would.
WIDE_MODES = ("1", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_SIXTEEN_BIT = (np.uint16, np.int16, np.int32)
_CONVERT_HINT = "give uint8 (0-255), uint16 (0-65535), float in [0, 1] or bool"


def pixels_of(item, name: str) -> np.ndarray:
    """A numpy array or a torch tensor -> its pixels as an (H, W) or (H, W, C) array (channels last), or one line
    naming the item when it cannot be an image (wrong kind, shape, device or layout)."""
    if isinstance(item, torch.Tensor):
        return _tensor_pixels(item, name)
    if not isinstance(item, np.ndarray):
        raise CaptionerError(f"{name}: {type(item).__name__} is not an image type: give a path, bytes, an open "
                             f"binary file, a PIL image, a numpy array or a torch tensor")
    shape = tuple(item.shape)
    array = item[:, :, 0] if item.ndim == 3 and shape[2] == 1 else item
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (2, 3, 4))):
        hint = "; for (3, H, W) use array.transpose(1, 2, 0)" if item.ndim == 3 and shape[0] in (1, 3, 4) else ""
        raise CaptionerError(f"{name}: array of shape {shape} is not an image: expected HxW, HxWx3 or HxWx4 "
                             f"(channels last){hint}")
    if 0 in array.shape[:2]:
        raise CaptionerError(f"{name}: array of shape {shape} holds no pixels")
    return array


def _tensor_pixels(t: torch.Tensor, name: str) -> np.ndarray:
    shape = tuple(t.shape)
    if t.layout != torch.strided:
        raise CaptionerError(f"{name}: a {str(t.layout).replace('torch.', '')} tensor is not an image: give a "
                             f"dense one (tensor.to_dense())")
    if t.is_meta:
        raise CaptionerError(f"{name}: a tensor on the meta device holds no pixels")
    if t.dim() == 3 and shape[0] in (1, 2, 3, 4):
        t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    elif not (t.dim() == 2 or (t.dim() == 3 and shape[2] in (1, 2, 3, 4))):
        raise CaptionerError(f"{name}: tensor of shape {shape} is not an image: expected (3, H, W) (channels "
                             f"first), (1, H, W), (H, W, 3) or (H, W)")
    t = t.detach().cpu().resolve_conj().resolve_neg()
    t = t.float() if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16; float32 holds its values exactly
    return pixels_of(t.numpy(), name)


def to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """The value rule of the module docstring: pixels of any accepted dtype -> uint8, same shape."""
    kind = array.dtype
    if kind == np.uint8:
        return array
    if kind == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(kind, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise CaptionerError(f"{name}: {bad} of {array.size} pixel values are NaN or infinite: pixels must be "
                                 f"finite numbers")
        return _scaled(array, name, 1.0, "float values must lie in [0, 1] (uint8 holds 0-255)", 255.0)
    if any(kind == np.dtype(t) for t in _SIXTEEN_BIT):
        return _scaled(array, name, 65535, "16-bit values must lie in 0..65535", 1 / 257)
    raise CaptionerError(f"{name}: {kind} pixels: {_CONVERT_HINT}")


def _scaled(array: np.ndarray, name: str, high: float, what: str, factor: float) -> np.ndarray:
    low_found, high_found = float(array.min()), float(array.max())
    if low_found < 0 or high_found > high:
        raise CaptionerError(f"{name}: {what}, got {low_found:g}..{high_found:g}")
    return np.round(array.astype(np.float64) * factor).astype(np.uint8)


def rgb_image(pixels: np.ndarray, name: str) -> Image.Image:
    """(H, W) or (H, W, C) pixels of any accepted dtype -> an RGB PIL image (alpha flattened onto white)."""
    values = to_uint8(pixels, name)
    channels = 1 if values.ndim == 2 else values.shape[2]
    return flatten_to_rgb(Image.fromarray(np.ascontiguousarray(values), _CHANNEL_MODES[channels]))


def pil_to_rgb(img: Image.Image, name: str) -> Image.Image:
    """A loaded PIL image of any mode -> RGB: modes that are not 8-bit by the array rule (so a mode-F image and
    its np.asarray give the same pixels), the others by Pillow's conversions."""
    if img.mode in WIDE_MODES:
        return rgb_image(np.asarray(img), name)
    return flatten_to_rgb(img)


def flatten_to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit PIL image -> RGB, transparent pixels onto white (palettes and colour keys made explicit first)."""
    if img.mode == "P" or "transparency" in img.info:  # palette or a transparent colour key: make alpha explicit
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
