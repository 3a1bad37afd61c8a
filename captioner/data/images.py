"""Image files -> resized uint8 tensors, and the Datasets that feed training, evaluation and captioning.

Normalisation is the encoder's job (it travels with the model); here images are only decoded and resized
to image_size x image_size, the same way at train and at eval time since the encoder is frozen.
Every Dataset here is a plain picklable object, so spawn-started DataLoader workers work too.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from captioner.data.records import ImageRecord
from captioner.errors import CaptionerError
from captioner.vocab import Vocabulary

MAX_PIXELS = 100_000_000  # larger images are refused as likely decompression bombs


def load_image(path: str, image_size: int) -> torch.Tensor:
    """Decode, apply EXIF orientation, flatten alpha onto white, resize -> (3, S, S) uint8."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise CaptionerError(f"{path}: {img.width}x{img.height} pixels is above the {MAX_PIXELS} limit")
                img.seek(0)  # animated formats: first frame
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                img = img.resize((image_size, image_size), Image.BICUBIC)
    except CaptionerError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as e:
        raise CaptionerError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, don't clip
        array = np.asarray(img, dtype=np.float64)
        top = array.max() or 1.0
        img = Image.fromarray((array / top * 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


class ImageFiles(Dataset):
    """Paths -> (image (3, S, S) uint8, index, error message or ""). A bad file yields zeros and its error."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return load_image(self.paths[i], self.image_size), i, ""
        except CaptionerError as e:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), i, str(e)


class CaptionPairs(Dataset):
    """One item per (image, caption): (image or cached features, caption ids (max_len+2,), length).

    `source[i]` gives the input for records[i]: an ImageFiles-like loader or a tensor of precomputed
    encoder activations, so training code is the same for both.
    """

    def __init__(self, records: list[ImageRecord], vocab: Vocabulary, max_len: int, source):
        self.source, self.max_len = source, max_len
        self.pairs = [(i, vocab.encode(c, max_len)) for i, r in enumerate(records) for c in r.captions]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        record_index, ids = self.pairs[i]
        caption = torch.full((self.max_len + 2,), Vocabulary.pad_id, dtype=torch.long)
        caption[: len(ids)] = torch.tensor(ids)
        return self.source[record_index], caption, len(ids)


class ImageSource:
    """records[i] -> (3, S, S) uint8; raises CaptionerError naming the file when it cannot be read."""

    def __init__(self, paths: list[str], image_size: int):
        self.paths, self.image_size = list(paths), image_size

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.image_size)
