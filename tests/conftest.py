"""Shared fixtures: a small synthetic dataset and one tiny trained model, built once per test session."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from captioner.jobs import train
from captioner.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"

# One thread: on 2 cores shared with anything else, two threads per process oversubscribe and run 10x slower.
torch.set_num_threads(1)


def tiny_config(data_root, *overrides):
    """configs/tiny.yaml on a smaller synthetic set, for fast tests."""
    return load_config(TINY, [f"dataset.root={data_root}", "dataset.synthetic_images=1000", "train.num_workers=0",
                              "compute.num_workers=0",
                              *overrides])


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_root):
    """(summary, cfg) of a tiny model trained on synthetic shapes: the learning test and the CLI tests use it."""
    logging.getLogger("captioner").setLevel(logging.WARNING)
    cfg = tiny_config(synthetic_root, "train.epochs=12")
    run_dir = tmp_path_factory.mktemp("run")
    return train.main(train.TrainJob(cfg, run_dir, "cpu")), cfg


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A fresh folder per test module for tests/small_runs.py's small synthetic set."""
    return tmp_path_factory.mktemp("small-synthetic")


def random_checkpoint(path: Path, seed: int = 1) -> Path:
    """A random-weight SqueezeNet model at 64x64 (a 3x3 grid; the smallest torchvision CNN, so that tests stay
    fast), its decoder weights spread so that different images get different captions, saved as `captioner
    train` saves a checkpoint."""
    from captioner.config import Config, to_dict
    from captioner.engine.infer.checkpoint import save_checkpoint
    from captioner.model.caption_model import CaptionModel
    from captioner.text import Vocabulary
    cfg = Config()
    cfg.encoder.arch, cfg.encoder.layer, cfg.encoder.image_size = "squeezenet1_1", "features", 64
    cfg.decode.beam_size, cfg.decode.max_len = 2, 12
    cfg.model.embed_dim = cfg.model.attention_dim = cfg.model.decoder_dim = 32
    vocab = Vocabulary.build(["a red square above a blue circle", "a green triangle left of a circle"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CaptionModel(cfg.encoder, cfg.model, len(vocab))
        for p in model.decoder.parameters():
            p.data.normal_(0, 0.5)
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "vocab": vocab.tokens,
                           "epoch": 3, "step": 42})
    return path


def noise_pngs(folder: Path, count: int, size: int, broken_jpeg: bool = False) -> Path:
    """folder/img000.png ... of random noise (seeded), plus a truncated broken.jpg when asked."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    if broken_jpeg:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    return folder


def photo_zoo(folder: Path, max_side: int | None = None) -> dict[str, Path]:
    """Real photos from ../shared/data/coco-mini as users' files come: name -> path. A plain JPEG, PNG with an
    alpha gradient, greyscale PNG and JPEG, a JPEG stored sideways with EXIF orientation 6, a palette PNG with a
    transparent colour, a 16-bit greyscale PNG, a CMYK JPEG, and big.jpg, a photo upscaled 4x: large enough for
    reduced-scale JPEG decoding at input sizes up to a quarter of its sides. max_side shrinks the photos first."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((COCO_MINI / "train2017").glob("*.jpg"))

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
    import numpy as np
    from PIL import Image, ImageOps
    upright = ImageOps.exif_transpose(Image.open(path))
    if upright.mode in ("P", "CMYK"):  # what np.asarray of them means is not an image: users convert first
        upright = upright.convert("RGBA" if "transparency" in upright.info else "RGB")
    array = np.asarray(upright)
    forms = {"pil": Image.open(path), "pil_loaded": upright, "array": array}
    if array.dtype == np.uint8:
        chw = torch.from_numpy(array.copy()).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array.copy())
        forms.update(tensor=chw, tensor_float=chw.float() / 255)
    return forms
