"""The builders tests share: paths, small configs, an untrained checkpoint, folders of images, run-dir readers.

Import them from here (`from helpers import small_config`), never from another test module; fixtures built
on them live in conftest.py.
"""
from __future__ import annotations

import io
import json
import os
import struct
import textwrap
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
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


class GridStub(torch.nn.Module):
    """Stands in for a frozen encoder giving (B, 24, 3, 3) features: decoder tests that need no CNN."""
    channels, grid, image_size = 24, (3, 3), 32


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
    """The small training setup (SMALL) on synthetic images generated under data_root, with extra's keys in place
    of SMALL's (the command line refuses a key given twice)."""
    keys = {item.partition("=")[0] for item in extra}
    return [f"dataset.root={data_root}", *[s for s in SMALL if s.partition("=")[0] not in keys], *extra]


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



def varied_checkpoint(path: Path, seed: int = 1) -> Path:
    """An untrained model on the smallest torchvision CNN (SqueezeNet 1.1 `features` at 64x64: a 3x3 grid, built
    in a fraction of resnet18's time), its decoder weights spread (N(0, 0.5)) so that different images get
    different captions: for tests of what decides a caption, in seconds. Saved as `captioner train` saves one."""
    state = untrained_state("encoder.arch=squeezenet1_1", "encoder.layer=features", *SMALL_MODEL,
                            "decode.beam_size=2", "decode.max_len=12", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state["model"].items():
        if name.startswith("decoder.") and tensor.is_floating_point():
            state["model"][name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_checkpoint(path, {**state, "epoch": 3, "step": 42})
    return path

# ---------------------------------------------------------------- run dirs

def metric_lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in metric_lines(run_dir) if "loss" in x]


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def killed_child(step: int, logger: str = "MetricsLog", flush: bool = False) -> str:
    """Python source of a child process that trains through the real CLI (argv: threads, then CLI arguments) and
    SIGKILLs itself right after `logger` (a class of engine/train/loggers.py) has written step `step`'s line,
    flushed to disk first when asked: a kill -9 at a known point, past the last checkpoint."""
    return textwrap.dedent(f"""
        import os, signal, sys
        import torch
        torch.set_num_threads(int(sys.argv[1]))
        from captioner.cli import main
        from captioner.engine.train.loggers import {logger} as Logger
        write = Logger.write
        def write_then_die(self, record):
            write(self, record)
            if record.get("step") == {step} and "loss" in record:
                {"self.flush()" if flush else "pass"}
                os.kill(os.getpid(), signal.SIGKILL)
        Logger.write = write_then_die
        sys.exit(main(sys.argv[2:]))
    """)


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



def photo_zoo(folder: Path, max_side: int | None = None) -> dict[str, Path]:
    """Real photos from ../shared/data/coco-mini as users' files come: name -> path. A plain JPEG, PNG with an
    alpha gradient, greyscale PNG and JPEG, a JPEG stored sideways with EXIF orientation 6, a palette PNG with a
    transparent colour, a 16-bit greyscale PNG, a CMYK JPEG, and big.jpg, a photo upscaled 4x: large enough for
    reduced-scale JPEG decoding at input sizes up to a quarter of its sides. max_side shrinks the photos first."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((COCO_MINI / "train2017").glob("*.jpg"))
    if len(photos) < 8:  # a checkout without ../shared beside it: skip, never an IndexError
        pytest.skip(f"needs the real photos of {COCO_MINI / 'train2017'}")

    def photo(i: int) -> Image.Image:
        image = Image.open(photos[i]).convert("RGB")
        if max_side:
            image.thumbnail((max_side, max_side), Image.BICUBIC)
        return image

    zoo = {name: folder / name for name in ("photo.jpg", "alpha.png", "grey.png", "grey.jpg", "rotated_exif.jpg",
                                            "palette.png", "grey16.png", "cmyk.jpg")}
    photo(0).save(zoo["photo.jpg"], quality=90)
    rgba = photo(1).convert("RGBA")
    ramp = np.linspace(0, 255, rgba.width).astype(np.uint8)  # transparent on the left, opaque on the right
    rgba.putalpha(Image.fromarray(np.tile(ramp, (rgba.height, 1))))
    rgba.save(zoo["alpha.png"])
    photo(2).convert("L").save(zoo["grey.png"])
    photo(3).convert("L").save(zoo["grey.jpg"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the pixels are stored turned the other way
    photo(4).transpose(Image.Transpose.ROTATE_90).save(zoo["rotated_exif.jpg"], quality=90, exif=exif)
    palette = photo(5).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(zoo["palette.png"], transparency=0)
    Image.fromarray((np.asarray(photo(6).convert("L"), dtype=np.uint16) * 257)).save(zoo["grey16.png"])
    photo(7).convert("CMYK").save(zoo["cmyk.jpg"], quality=90)
    big = photo(8)
    zoo["big.jpg"] = folder / "big.jpg"
    big.resize((big.width * 4, big.height * 4), Image.BICUBIC).save(zoo["big.jpg"], quality=90)
    return zoo


def in_memory_forms(path: Path) -> dict:
    """How a notebook holds the image in path: a lazily opened PIL image, a decoded upright one, its pixels as a
    numpy array (channels last, alpha kept, 16-bit kept) and as (C, H, W) uint8 and float tensors."""
    from PIL import ImageOps
    upright = ImageOps.exif_transpose(Image.open(path))
    if upright.mode in ("P", "CMYK"):  # what np.asarray of them means is not an image: users convert first
        upright = upright.convert("RGBA" if "transparency" in upright.info else "RGB")
    array = np.asarray(upright)
    forms = {"pil": Image.open(path), "pil_loaded": upright, "array": array}
    if array.dtype == np.uint8:
        chw = torch.from_numpy(array.copy()).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array.copy())
        forms.update(tensor=chw, tensor_float=chw.float() / 255)
    return forms


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


def sigterm_after_step(monkeypatch, step: int):
    """SIGTERM to this process as training logs step's loss: a signal landing during step + 1, which the loop
    handles after that step. Returns what puts the metrics log back (for a resume in the same test)."""
    import signal
    from captioner.engine.train.loggers import MetricsLog
    write = MetricsLog.write

    def write_then_terminate(self, record):
        write(self, record)
        if record.get("step") == step and "loss" in record:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_terminate)
    return lambda: monkeypatch.setattr(MetricsLog, "write", write)

