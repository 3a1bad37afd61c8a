"""Image files -> resized uint8 tensors, and the Datasets that feed training, evaluation and captioning.

Normalisation is the encoder's job (it travels with the model); here images are only decoded and resized
to image_size x image_size with the encoder's interpolation (bicubic or bilinear, as its weights were trained),
the same way at train and at eval time since the encoder is frozen. The whole photo is squashed to the square,
never cropped: a caption is about everything in it.
Every Dataset here is a plain picklable object, so spawn-started DataLoader workers work too.

    image = load_image("photo.jpg", 224)          # (3, 224, 224) uint8, or a one-line CaptionerError
    image, (width, height) = read_image_bytes(upload, "upload.jpg", 224)   # the server's uploads: same rules
    image, (width, height) = read_any(pil_image_or_array_or_tensor, "images[3]", 224)  # the Python API's inputs

Every input becomes a PIL image, then goes through one function (`_prepare`: pixel limit, EXIF orientation,
data/pixels.py's one conversion rule to 8-bit RGB, alpha onto white, resize), so the same pixels give the same
model input whichever way they come in. A
file (a path, its bytes, an open binary file, or a PIL image opened lazily from a file, read again from it) is
decoded at reduced scale when it is a JPEG at least four times the input size on both sides (JPEG draft mode:
1/2, 1/4 or 1/8 scale, still at least twice the input size); pixels already decoded (a numpy array, a tensor, a
loaded PIL image) can only be resized from full size, so for such large JPEGs they differ from the file's
input by a few intensity levels. Which arrays, tensors and PIL modes are images, and how their values map to
0-255 (uint8 as is, 16-bit / 257, floats in [0, 1] x 255; NaN, infinity and out-of-range values refused): see
data/pixels.py.

Every decoding setting travels with the call, never through a process-wide switch (two Captioners with
different limits may decode in two threads at once): the pixel limit is checked on the header's size after
Image.open and before any pixel is decoded; Pillow's own globals (Image.MAX_IMAGE_PIXELS,
ImageFile.LOAD_TRUNCATED_IMAGES) and the warnings filters are read by Pillow, never set here.

Any file is either decoded or refused with a CaptionerError naming it and saying what is wrong: empty,
truncated, not an image (an HTML page saved as .jpg, ...), above the pixel limit (decompression bomb), a
folder, a FIFO or device (never opened: reading it could block forever), a broken symbolic link, unreadable.
Accepted: every mode Pillow decodes (greyscale, palette, CMYK, 16-bit, float, alpha), EXIF orientation
applied, the first frame of animations.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from captioner.data.pixels import pil_to_rgb, pixels_of, rgb_image
from captioner.data.records import ImageRecord
from captioner.errors import CaptionerError, CaptionerFileError, ErrorText
from captioner.text import Vocabulary

MAX_PIXELS = 100_000_000  # larger images are refused as likely decompression bombs

# First bytes of files that users save with an image extension by mistake (downloads gone wrong, ...).
_NOT_IMAGE_SIGNATURES = {b"<!doctype html": "an HTML page", b"<html": "an HTML page", b"<?xml": "an XML file",
                         b"%pdf": "a PDF document", b"pk\x03\x04": "a ZIP archive", b"{": "JSON or text"}
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")
_ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5-8 swap width and height
JPEG_MAGIC = b"\xff\xd8\xff"


# The resize filters of encoder.interpolation (config.INTERPOLATIONS), as Pillow names them.
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def load_image(path: str, image_size: int, max_pixels: int = MAX_PIXELS,
               interpolation: str = "bicubic") -> torch.Tensor:
    """Decode, apply EXIF orientation, flatten alpha onto white, resize -> (3, S, S) uint8."""
    return read_image(path, image_size, max_pixels, interpolation)[0]


def read_image(path: str, image_size: int, max_pixels: int = MAX_PIXELS,
               interpolation: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
    """load_image, also returning the file's (width, height) as displayed (after EXIF orientation)."""
    _check_is_regular_file(path)
    return _decode(path, path, image_size, max_pixels, interpolation)


def read_image_bytes(data: bytes, name: str, image_size: int, max_pixels: int = MAX_PIXELS,
                     interpolation: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
    """read_image for an upload's bytes (the server never opens a path a client names); errors start with name."""
    if not data:
        raise CaptionerFileError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, image_size, max_pixels, interpolation)


def read_any(item, name: str, image_size: int, max_pixels: int = MAX_PIXELS,
             interpolation: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
    """read_image for any input of the Python API: a path, a file's bytes or an open binary file (read as serve
    reads uploads), a PIL image, a numpy array or a torch tensor.

    name: how errors call the item ("images[3]"; a path is named by itself)."""
    if isinstance(item, (str, os.PathLike)):
        return read_image(os.fspath(item), image_size, max_pixels, interpolation)
    if isinstance(item, (bytes, bytearray, memoryview)):  # a file's bytes, as serve's uploads
        return read_image_bytes(bytes(item), name, image_size, max_pixels, interpolation)
    if hasattr(item, "read") and not isinstance(item, Image.Image):  # an open binary file, io.BytesIO
        return read_image_bytes(_read_file_object(item, name), name, image_size, max_pixels, interpolation)
    if isinstance(item, Image.Image):
        filename = _lazy_file(item)
        if filename:  # not decoded yet: read from its file, as a path is (reduced-scale JPEG decoding included)
            return read_image(filename, image_size, max_pixels, interpolation)
        return _decode_loaded(item, name, image_size, max_pixels, interpolation)
    with _failures_named(name, None, max_pixels):  # numpy and torch raise many types on odd arrays: one line
        pixels = pixels_of(item, name)
        _check_pixel_count(name, pixels.shape[1], pixels.shape[0], max_pixels)  # before converting any value
        return _prepare(rgb_image(pixels, name), name, image_size, max_pixels, interpolation, reduce=False)


def _read_file_object(item, name: str) -> bytes:
    """The bytes of an open binary file (from where it stands), or one line: closed, not readable, text mode."""
    try:
        data = item.read()
    except ValueError as e:  # io raises ValueError on a closed file; io.UnsupportedOperation (write-only) is both
        closed = getattr(item, "closed", False) is True or "closed" in str(e)
        raise CaptionerFileError(f"{name}: {'the file is closed' if closed else 'not open for reading'}: give an "
                                 f"open binary file (open(path, 'rb'))") from None
    except OSError as e:
        raise CaptionerFileError(f"{name}: cannot read the file ({e.strerror or e})") from None
    if isinstance(data, str):
        raise CaptionerError(f"{name}: a file opened in text mode: open it with 'rb'")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CaptionerError(f"{name}: its read() gave {type(data).__name__}, not bytes: give an open binary file")
    return bytes(data)


def _lazy_file(img: Image.Image) -> str:
    """The file a PIL image was opened from and not yet decoded (nor drafted by its owner), else ""."""
    filename = getattr(img, "filename", "") or ""
    undecoded = isinstance(img, ImageFile.ImageFile) and bool(img.tile) and not getattr(img, "decoderconfig", ())
    return filename if undecoded and isinstance(filename, str) and os.path.isfile(filename) else ""


def _decode(source, name: str, image_size: int, max_pixels: int,
            interpolation: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """source: a path or a binary file object; name: how errors call it."""
    with _failures_named(name, source, max_pixels), Image.open(source) as img:
        return _prepare(img, name, image_size, max_pixels, interpolation, reduce=True)


def _decode_loaded(img: Image.Image, name: str, image_size: int, max_pixels: int,
                   interpolation: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """An in-memory PIL image (never changed: every step makes a new image) -> as _decode."""
    with _failures_named(name, None, max_pixels):
        return _prepare(img, name, image_size, max_pixels, interpolation, reduce=False)


@contextlib.contextmanager
def _failures_named(name: str, source, max_pixels: int):
    """Every failure of one decode as one CaptionerError starting with name."""
    try:
        yield
    except CaptionerError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check (twice Image.MAX_IMAGE_PIXELS), at open
        raise CaptionerError(f"{name}: {_pillow_bomb(e, max_pixels)}") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data (OSError, SyntaxError, ...)
        reason = _describe_failure(source, e)
        raise (CaptionerFileError if reason == "permission denied" else CaptionerError)(f"{name}: {reason}") from None


def _prepare(img: Image.Image, name: str, image_size: int, max_pixels: int, interpolation: str,
             reduce: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """The one preprocessing of every input, from the point where it is a PIL image: pixel limit, (reduce: JPEG
    reduced-scale decoding), EXIF orientation, alpha onto white, resize with the encoder's filter -> ((3, S, S)
    uint8, the (width, height) as displayed)."""
    width, height = img.size
    _check_pixel_count(name, width, height, max_pixels)  # from the header: nothing is decoded yet
    if 0 in img.size:
        raise CaptionerError(f"{name}: a {width}x{height} image holds no pixels")
    if reduce:
        # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale while that still leaves twice the
        # target size, so a 12-megapixel photo is not fully decoded to make a 224x224 input.
        img.draft("RGB", (2 * image_size, 2 * image_size))
    img.load()  # decode now, inside the caller's try: truncated or corrupt data fails here, never half-decoded
    img, swapped = _apply_exif_orientation(img)
    img = pil_to_rgb(img, name).resize((image_size, image_size), PIL_FILTERS[interpolation])
    size = (height, width) if swapped else (width, height)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), size  # (S, S, 3) -> (3, S, S)


def _pillow_bomb(error: Exception, max_pixels: int) -> str:
    """Pillow refused the image at open: above our limit too (the usual case), or only above Pillow's own,
    which stays the program's to set (captioner never changes it: it is process-wide)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    if found is None or int(found[1]) > max_pixels:
        return f"image size is above the limit of {max_pixels} pixels (a decompression bomb?)"
    return (f"{found[1]} pixels is above Pillow's own limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} (twice "
            f"PIL.Image.MAX_IMAGE_PIXELS, which captioner never changes: raise it in your program to read such "
            f"images)")


def _check_pixel_count(name: str, width: int, height: int, max_pixels: int) -> None:
    """The pixel limit, this call's own (never Pillow's global), checked before anything is decoded."""
    if width * height > max_pixels:
        raise CaptionerError(f"{name}: {width}x{height} is above the limit of {max_pixels} pixels "
                             f"(a decompression bomb?)")


def _check_is_regular_file(path: str) -> None:
    """Refuse what Image.open should never see: missing files, folders, FIFOs and devices (reads block)."""
    try:
        info = os.stat(path)  # follows symbolic links
    except FileNotFoundError:
        if os.path.islink(path):
            raise CaptionerFileError(f"{path}: broken symbolic link to {os.readlink(path)}") from None
        raise CaptionerFileError(f"{path}: no such file") from None
    except OSError as e:  # a symbolic link loop, a folder on the way that cannot be entered, ...
        raise CaptionerFileError(f"{path}: cannot access ({e.strerror or e})") from None
    except ValueError:  # a NUL character, or text this file system's encoding cannot hold: no file has that name
        why = "it holds a NUL character" if "\x00" in path else "it cannot be encoded as a file name here"
        raise CaptionerFileError(f"{path!r}: not a file name ({why})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CaptionerFileError(f"{path}: is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise CaptionerFileError(f"{path}: is {kind}, not a regular file; not read")
    if info.st_size == 0:
        raise CaptionerFileError(f"{path}: empty file (0 bytes)")


def _describe_failure(source, e: Exception) -> str:
    if isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EACCES:
        return "permission denied"
    if isinstance(e, Image.UnidentifiedImageError):
        try:
            if isinstance(source, io.BytesIO):
                head = source.getvalue()[:32]
            else:
                with open(source, "rb") as f:
                    head = f.read(32)
        except OSError:  # gone or changed since: no hint, the error stands
            head = b""
        if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
            return "HEIC/HEIF image, which Pillow cannot decode: convert it to JPEG (e.g. with heif-convert)"
        kind = next((what for sig, what in _NOT_IMAGE_SIGNATURES.items() if head.lstrip().lower().startswith(sig)),
                    None)
        return f"not an image: looks like {kind}" if kind else "not an image, or a format Pillow cannot read"
    reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    if "truncated" in reason:
        return reason  # Pillow's "image file is truncated (143 bytes not processed)" says it all
    return f"cannot decode image ({type(e).__name__}: {reason[:200]})"


def _apply_exif_orientation(img: Image.Image) -> tuple[Image.Image, bool]:
    """Rotate/flip as the EXIF orientation tag says; returns (image, whether width and height swapped)."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        return ImageOps.exif_transpose(img), orientation in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - corrupt EXIF: the pixels are fine, keep them as stored
        return img, False


def _plain_jpeg(path: str, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a JPEG the batch decoder handles exactly like PIL (RGB or greyscale, upright, not
    oversized), else None: anything else is decoded by PIL, which also reports what is wrong with it."""
    try:
        with open(path, "rb") as f:
            if f.read(3) != JPEG_MAGIC:
                return None
        with Image.open(path) as img:  # reads the header only
            plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= max_pixels
                     and img.getexif().get(_ORIENTATION_TAG, 1) == 1)
            return img.size if plain else None
    except Exception:  # noqa: BLE001 - anything odd goes to PIL, which reports it properly
        return None


class ImageFiles(Dataset):
    """Paths (or any input read_any takes) -> (image (3, S, S) uint8, index, error message or "", the image's
    (width, height) as a (2,) tensor).

    A bad file yields zeros, (0, 0) and its error, so it never stops a worker. gpu_decode (GPU decoding): plain
    JPEGs come back as their file bytes, (n,) uint8, for the batch decoder; other files are decoded here.
    names: what errors call the in-memory items (default "image I"); a path is named by itself."""

    def __init__(self, paths: list, image_size: int, max_pixels: int = MAX_PIXELS, gpu_decode: bool = False,
                 names: list[str] | None = None, interpolation: str = "bicubic"):
        self.paths, self.image_size, self.max_pixels, self.gpu_decode = list(paths), image_size, max_pixels, gpu_decode
        self.names = names
        self.interpolation = interpolation  # the encoder's resize filter

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        item = self.paths[i]
        if isinstance(item, (str, os.PathLike)):
            return os.fspath(item)
        return self.names[i] if self.names else f"image {i}"

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            size = _plain_jpeg(path, self.max_pixels) if self.gpu_decode and isinstance(path, str) else None
            if size is not None:
                with open(path, "rb") as f:
                    return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), i, "", torch.tensor(size)
            (image, size), message = read_any(path, self.name(i), self.image_size, self.max_pixels,
                                              self.interpolation), ""
        except CaptionerError as e:
            image, size, message = (torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), (0, 0),
                                    ErrorText.of(e))
        except OSError as e:  # the file went away between the header check and the read
            image, size, message = (torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), (0, 0),
                                    ErrorText.of(CaptionerFileError(f"{self.name(i)}: cannot read "
                                                                    f"({e.strerror or e})")))
        return image, i, message, torch.tensor(size)


class CaptionPairs(Dataset):
    """One item per (image, caption): (input, record index, error or "", size (2,), caption ids (max_len+2,),
    length), the first four fields as ImageFiles gives them.

    `source[i]` gives the input for records[i]: an ImageFiles over the records' paths (an unreadable image
    comes with its error, and the batch iterator drops its rows) or encoder activations (a tensor or a
    feature-cache source), so training code is the same for both.
    """

    def __init__(self, records: list[ImageRecord], vocab: Vocabulary, max_len: int, source, per_image: bool = False):
        self.source, self.max_len = source, max_len
        # per_image: one item per image (with its first caption): self-critical training samples its own captions
        self.pairs = [(i, vocab.encode(c, max_len)) for i, r in enumerate(records)
                      for c in (r.captions[:1] if per_image else r.captions)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        record_index, ids = self.pairs[i]
        caption = torch.full((self.max_len + 2,), Vocabulary.pad_id, dtype=torch.long)
        caption[: len(ids)] = torch.tensor(ids)
        if isinstance(self.source, ImageFiles):
            data, _, message, size = self.source[record_index]
        else:
            data, message, size = self.source[record_index], "", torch.zeros(2, dtype=torch.long)
        return data, record_index, message, size, caption, len(ids)
