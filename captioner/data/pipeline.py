"""Batches of images on the device, decoded and resized off the main process or on the GPU.

    for images, index, errors in image_batches(paths, 224, batch_size=64, num_workers=8, device=device):
        ...   # images (B, 3, 224, 224) uint8 on device; index (B,) into paths; errors[j] "" or why j failed

CPU decoding (the default): DataLoader workers decode and resize with PIL (data/images.py), the batch goes
through pinned memory and is copied without blocking. GPU decoding (compute.gpu_decode, CUDA only): workers
only read the file bytes, nvjpeg decodes the whole batch and the GPU resizes it with antialiased bicubic
interpolation, which matches PIL's to within a few intensity levels (mean difference ~0.2 of 255). Files that
are not plain RGB or greyscale JPEGs (PNG, CMYK, EXIF-rotated, huge) are decoded by PIL in the worker instead.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from captioner.data.images import MAX_PIXELS, ImageFiles, load_image
from captioner.errors import CaptionerError

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def _plain_jpeg(path: str) -> bool:
    """A JPEG the batch decoder handles exactly like PIL: RGB or greyscale, upright, not oversized."""
    try:
        with open(path, "rb") as f:
            if f.read(3) != JPEG_MAGIC:
                return False
        with Image.open(path) as img:  # reads the header only
            return (img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= MAX_PIXELS
                    and img.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # noqa: BLE001 - anything odd goes to PIL, which reports it properly
        return False


class JpegBytes(Dataset):
    """Paths -> (raw JPEG bytes (n,) uint8, or a PIL-decoded (3, S, S) uint8 image; index; error or "")."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            if _plain_jpeg(path):
                with open(path, "rb") as f:
                    return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), i, ""
            return load_image(path, self.image_size), i, ""
        except (CaptionerError, OSError) as e:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), i, str(e)


def collate_bytes(items):
    """Keep the variable-length byte tensors as a list (default_collate would try to stack them)."""
    data, index, errors = zip(*items)
    return list(data), torch.tensor(index), list(errors)


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)


def resize_batch(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """Images (3, H_i, W_i) uint8 of any sizes -> (B, 3, S, S) uint8, one interpolate call per distinct size."""
    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple, list[int]] = {}
    for j, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(j)
    for positions in by_size.values():
        group = torch.stack([images[j] for j in positions]).float()  # (b, 3, H, W)
        resized = F.interpolate(group, size=(image_size, image_size), mode="bicubic", antialias=True,
                                align_corners=False)  # antialiased bicubic: PIL's BICUBIC resize
        out[positions] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def decode_batch(items: list[torch.Tensor], paths: list[str], image_size: int, device: torch.device,
                 errors: list[str]) -> torch.Tensor:
    """JpegBytes items -> (B, 3, S, S) uint8 on device. A file the batch decoder rejects is read by PIL instead
    (errors[j] gets PIL's message when that fails too)."""
    jpegs = [j for j, t in enumerate(items) if t.dim() == 1]
    images: list[torch.Tensor | None] = [t.to(device, non_blocking=True) if t.dim() == 3 else None for t in items]
    try:
        decoded = _decode_jpegs([items[j] for j in jpegs], device) if jpegs else []
    except RuntimeError:  # the batch fails as a whole on one bad file: decode one by one
        decoded = []
        for j in jpegs:
            try:
                decoded.append(_decode_jpegs([items[j]], device)[0])
            except RuntimeError:
                decoded.append(None)
    for j, image in zip(jpegs, decoded):
        images[j] = image
    out = torch.empty(len(items), 3, image_size, image_size, dtype=torch.uint8, device=device)
    full_size = [j for j in jpegs if images[j] is not None]
    if full_size:
        out[full_size] = resize_batch([images[j] for j in full_size], image_size)
    for j in set(range(len(items))) - set(full_size):
        image = images[j]
        if image is None:  # the batch decoder refused it: PIL decodes it, or says why it cannot
            try:
                image = load_image(paths[j], image_size).to(device)
            except CaptionerError as e:
                image, errors[j] = torch.zeros(3, image_size, image_size, dtype=torch.uint8), str(e)
        out[j] = image
    return out


def image_batches(paths: list[str], image_size: int, batch_size: int, num_workers: int, device: torch.device,
                  device_decode: bool = False):
    """Yield (images (B, 3, S, S) uint8 on device, index (B,) long into paths, errors list of B strings).

    A file that cannot be read gives a zero image and its error message; callers skip it and report it.
    device_decode: workers only read bytes and `device` decodes them in batches (nvjpeg on CUDA; on CPU the
    main process would decode, which only tests use).
    """
    num_workers = min(num_workers, len(paths))
    if device_decode:
        loader = DataLoader(JpegBytes(paths, image_size), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_bytes)
        for items, index, errors in loader:
            yield decode_batch(items, [paths[i] for i in index.tolist()], image_size, device, errors), index, errors
        return
    loader = DataLoader(ImageFiles(paths, image_size), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for images, index, errors in loader:
        yield images.to(device, non_blocking=True), index, list(errors)
