"""The builders tests share: paths, small configs, an untrained checkpoint, folders of images, run-dir readers.

Import them from here (`from helpers import small_config`), never from another test module; fixtures built
on them live in conftest.py.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner.config import load_config, to_dict
from captioner.engine.infer.checkpoint import save_checkpoint
from captioner.model.caption_model import CaptionModel
from captioner.text import Vocabulary

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"

# ---------------------------------------------------------------- configs

# The one small model: at 64x64 resnet18's layer4 is a 2x2 grid, and 32-wide layers train in seconds.
SMALL_MODEL = ["encoder.image_size=64", "model.embed_dim=32", "model.attention_dim=32", "model.decoder_dim=32"]

# 60 synthetic images -> 48 train images, 144 captions: 9 steps of 16 per epoch, 18 in all.
SMALL = ["dataset.synthetic_images=60", "train.num_workers=0", "compute.num_workers=0", *SMALL_MODEL,
         "train.batch_size=16", "train.epochs=2", "train.log_every=1", "train.checkpoint_every=3",
         "decode.batch_size=16"]


def tiny_config(data_root, *overrides):
    """configs/tiny.yaml on a smaller synthetic set, for fast tests."""
    return load_config(TINY, [f"dataset.root={data_root}", "dataset.synthetic_images=1000", "train.num_workers=0",
                              "compute.num_workers=0", *overrides])


def small_overrides(data_root, *extra) -> list[str]:
    """The small training setup (SMALL) on synthetic images generated under data_root, then extra."""
    return [f"dataset.root={data_root}", *SMALL, *extra]


def small_config(data_root, *extra):
    return load_config(TINY, small_overrides(data_root, *extra))


# ---------------------------------------------------------------- an untrained checkpoint

SHAPE_CAPTIONS = ["a red circle left of a blue square", "a green triangle above a small square"]


def untrained_state(*overrides: str, seed: int = 0, captions=SHAPE_CAPTIONS) -> dict:
    """The checkpoint dict of an untrained configs/tiny.yaml model (plus overrides), with the vocabulary of
    `captions`: the tools' bookkeeping needs no good captions. Untrained captions run to decode.max_len, so
    callers keep it short."""
    torch.manual_seed(seed)
    cfg = load_config(TINY, list(overrides))
    vocab = Vocabulary.build(list(captions))
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab))
    return {"model": model.state_dict(), "config": to_dict(cfg), "vocab": vocab.tokens}


def untrained_checkpoint(path: Path, *overrides: str, seed: int = 0, captions=SHAPE_CAPTIONS) -> str:
    """untrained_state(...) saved at path, as `captioner train` saves one; returns the path as a string."""
    save_checkpoint(path, untrained_state(*overrides, seed=seed, captions=captions))
    return str(path)


# ---------------------------------------------------------------- run dirs

def metric_lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in metric_lines(run_dir) if "loss" in x]


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ---------------------------------------------------------------- folders of images

RED, BLUE = (220, 20, 20), (20, 20, 220)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def noise_pngs(folder: Path, count: int, size: int, broken_jpeg: bool = False) -> Path:
    """folder/img000.png ... of random noise (seeded), plus a truncated broken.jpg when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    if broken_jpeg:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    return folder


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte, for what PIL will not write (16-bit RGB) or must not (a bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> None:
    img.save(path, fmt, **kwargs)


def make_input_folder(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Every kind of input a caption tool meets -> (good file names, {bad file name: expected words of its error})."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    halves = Image.new("RGB", (40, 20), RED)
    halves.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    good = {
        "photo.jpg": lambda p: _save(photo, p, quality=90),
        "progressive.jpeg": lambda p: _save(photo, p, "JPEG", progressive=True),
        "rotated_exif.jpg": lambda p: _save(halves, p, exif=exif.tobytes()),
        "cmyk.jpg": lambda p: _save(photo.convert("CMYK"), p),
        "grey.png": lambda p: _save(photo.convert("L"), p),
        "palette.png": lambda p: _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), p),
        "alpha.png": lambda p: _save(photo.convert("RGBA"), p),
        "grey_alpha.png": lambda p: _save(photo.convert("LA"), p),
        "grey16.png": lambda p: _save(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), p),
        "rgb16.png": lambda p: p.write_bytes(png_bytes(8, 8, 16, 2, (b"\0" + b"\x80\x00" * 24) * 8)),
        "lossy.webp": lambda p: _save(photo, p, "WEBP"),
        "alpha.webp": lambda p: _save(photo.convert("RGBA"), p, "WEBP", lossless=True),
        "bitmap.bmp": lambda p: _save(photo, p),
        "bilevel.bmp": lambda p: _save(photo.convert("1"), p),
        "animated.gif": lambda p: _save(Image.new("RGB", (16, 16), RED), p, save_all=True,
                                        append_images=[Image.new("RGB", (16, 16), BLUE)], duration=100),
        "lzw.tiff": lambda p: _save(photo, p, compression="tiff_lzw"),
        "cmyk.tif": lambda p: _save(photo.convert("CMYK"), p),
        "grey16.tif": lambda p: _save(Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)), p),
        "float.tif": lambda p: _save(Image.fromarray(rng.random((16, 16), dtype=np.float32)), p),
        "one_pixel.png": lambda p: _save(Image.new("RGB", (1, 1), RED), p),
        "very_wide.jpg": lambda p: _save(Image.new("RGB", (3000, 6), BLUE), p),
        "very_tall.png": lambda p: _save(Image.new("RGB", (4, 1500), RED), p),
        "café ünïcødé 写真.jpg": lambda p: _save(photo, p),
        "SHOUTING.JPG": lambda p: _save(photo, p, "JPEG"),
        "png_named.jpg": lambda p: _save(photo, p, "PNG"),
    }
    for name, write in good.items():
        write(folder / name)
    os.symlink("photo.jpg", folder / "link_to_photo.jpg")
    good_names = [*good, "link_to_photo.jpg"]
    latin1 = os.fsdecode(b"latin1_\xe9t\xe9.jpg")  # a name that is not UTF-8 (an old archive)
    try:
        _save(photo, folder / latin1, "JPEG")
        good_names.append(latin1)
    except (OSError, UnicodeEncodeError):
        pass  # a file system that insists on UTF-8 names

    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    png = io.BytesIO()
    photo.save(png, "PNG")
    bad = {
        "empty.jpg": ("empty file", lambda p: p.write_bytes(b"")),
        "truncated.jpg": ("truncated", lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])),
        "truncated.png": ("truncated", lambda p: p.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])),
        "text.jpg": ("not an image", lambda p: p.write_bytes(b"just some text, not pixels\n")),
        "page.png": ("HTML page", lambda p: p.write_bytes(b"<!DOCTYPE html><html><body>404</body></html>")),
        "bomb.png": ("above the limit", lambda p: p.write_bytes(png_bytes(30000, 30000, 8, 0, b"\0" * 30001))),
        "bomb_120mp.png": ("12000x10000 is above the limit",
                           lambda p: p.write_bytes(png_bytes(12000, 10000, 8, 0, b"\0"))),
        "broken_link.jpg": ("broken symbolic link", lambda p: os.symlink("gone.jpg", p)),
        "loop.jpg": ("cannot access", lambda p: os.symlink("loop.jpg", p)),
        "fifo.jpg": ("FIFO", lambda p: os.mkfifo(p)),
    }
    if not AS_ROOT:  # root reads any file whatever its mode: there the FIFO and the loop stand for unreadable
        bad["unreadable.jpg"] = ("permission denied", lambda p: (_save(photo, p, "JPEG"), os.chmod(p, 0)))
    for name, (_, write) in bad.items():
        write(folder / name)
    (folder / ".hidden.jpg").write_bytes(b"macOS resource fork")  # hidden: never picked up
    (folder / "notes.md").write_text("not an image extension: ignored")
    return good_names, {name: words for name, (words, _) in bad.items()}


# ---------------------------------------------------------------- captions files and galleries

def read_records(path: Path) -> list[dict]:
    """The records of a JSONL captions file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def by_name(rows: list[dict]) -> dict[str, dict]:
    """{file's base name: record}, asserting that no file has two records."""
    names = [os.path.basename(r["file"]) for r in rows]
    assert len(names) == len(set(names)), "duplicate records"
    return dict(zip(names, rows))


class GalleryParser(HTMLParser):
    """A gallery page's entries ({file: [alt text of each word's attention map]}) and error entries."""

    def __init__(self):
        super().__init__()
        self.entries, self.errors, self.current = {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "entry" in (attrs.get("class") or "").split():
            file = attrs["data-file"]
            if "error" in attrs["class"]:
                self.errors[file] = True
            else:
                assert "data:image/jpeg;base64," in attrs["style"]  # the thumbnail is embedded
                self.current = self.entries.setdefault(file, [])
        elif tag == "img" and self.current is not None:
            assert attrs["src"].startswith("data:image/png;base64,")
            self.current.append(attrs["alt"])


def parse_gallery(path: Path) -> GalleryParser:
    parser = GalleryParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))  # valid UTF-8 whatever the file names
    return parser
