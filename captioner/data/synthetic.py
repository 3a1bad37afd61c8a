"""A synthetic captioning dataset: two coloured shapes in a spatial relation, several templated captions each.

    generate("data/synthetic", num_images=2000, seed=0)

writes images/000000.jpg ..., captions.json (COCO captions format) and splits.json ({"train": [ids], ...}).
The same seed always gives the same images, captions and splits.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.data.records import read_json
from captioner.errors import CaptionerError
from captioner.files import write_bytes, write_json

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 170), "white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {  # relation of the first object to the second: (dx, dy) sign, phrase, inverse phrase
    "left": ((-1, 0), "to the left of", "to the right of"),
    "right": ((1, 0), "to the right of", "to the left of"),
    "above": ((0, -1), "above", "below"),
    "below": ((0, 1), "below", "above"),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def make_example(rng: random.Random, size: int = 128) -> tuple[Image.Image, list[str]]:
    (c1, c2) = rng.sample(sorted(COLOURS), 2)
    s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
    relation = rng.choice(sorted(RELATIONS))
    (dx, dy), phrase, inverse = RELATIONS[relation]
    background = tuple(rng.randint(110, 160) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.12, 0.17)
    # Object 1 on one side of the centre, object 2 mirrored on the other, with some jitter.
    offset = size * rng.uniform(0.2, 0.28)
    jitter = lambda: size * rng.uniform(-0.08, 0.08)  # noqa: E731
    cx, cy = size / 2, size / 2
    p1 = (cx + dx * offset + (jitter() if dx == 0 else 0), cy + dy * offset + (jitter() if dy == 0 else 0))
    p2 = (cx - dx * offset + (jitter() if dx == 0 else 0), cy - dy * offset + (jitter() if dy == 0 else 0))
    _draw_shape(draw, s1, *p1, r, COLOURS[c1])
    _draw_shape(draw, s2, *p2, r, COLOURS[c2])
    a, b = f"a {c1} {s1}", f"a {c2} {s2}"
    captions = [f"{a} {phrase} {b}", f"{b} {inverse} {a}", f"there is {a} {phrase} {b}"]
    return image, captions


GENERATOR = "captioner synthetic shapes"
# The config keys behind each setting, for the error that names what differs.
_SETTING_KEYS = {"num_images": "dataset.synthetic_images", "seed": "dataset.synthetic_seed", "size": "image size",
                 "val_fraction": "dataset.val_fraction"}


def _check_settings(root: Path, wanted: dict) -> None:
    """Refuse a synthetic folder made with other settings (another size or seed would train and score on data
    other than the config's). Folders written before the settings were recorded are checked by image count."""
    data = read_json(root / "captions.json", "synthetic dataset file")
    made = data.get("info") if isinstance(data, dict) else None
    if not isinstance(made, dict) or made.get("generator") != GENERATOR:
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise CaptionerError(f"{root / 'captions.json'} is not a synthetic dataset file: set dataset.root to "
                                 f"another folder for the synthetic data")
        made = {"num_images": len(images)}
    differ = [f"{_SETTING_KEYS[k]} {made[k]} (the config asks for {wanted[k]})"
              for k in _SETTING_KEYS if k in made and made[k] != wanted[k]]
    if differ:
        raise CaptionerError(f"synthetic dataset {root} was generated with other settings: {'; '.join(differ)}; "
                             f"set dataset.root to another folder, or delete {root} to generate it again")


def generate(root: str | Path, num_images: int = 2000, seed: int = 0, size: int = 128,
             val_fraction: float = 0.1) -> Path:
    """Write the dataset under root (idempotent: an existing complete dataset made with the same settings is
    left as it is; one made with other settings is an error, never silently used instead)."""
    root = Path(root)
    annotations = root / "captions.json"
    settings = {"generator": GENERATOR, "num_images": num_images, "seed": seed, "size": size,
                "val_fraction": val_fraction}
    if annotations.is_file() and (root / "splits.json").is_file():
        _check_settings(root, settings)
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, anns = [], []
    for i in range(num_images):
        image, captions = make_example(rng, size)
        name = f"{i:06d}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        write_bytes(root / "images" / name, buffer.getvalue(), "synthetic image", durable=False)  # a rerun redoes them
        images.append({"id": i, "file_name": name, "width": size, "height": size})
        anns.extend({"id": len(anns), "image_id": i, "caption": c} for c in captions)
    n_held = max(1, int(num_images * val_fraction))
    ids = list(range(num_images))
    splits = {"train": ids[: num_images - 2 * n_held], "val": ids[num_images - 2 * n_held: num_images - n_held],
              "test": ids[num_images - n_held:]}
    # Written last and atomically: their presence marks a complete dataset.
    captions = {"info": settings, "images": images, "annotations": anns}
    for name, data in (("splits.json", splits), ("captions.json", captions)):
        write_json(root / name, data, "synthetic dataset file", indent=None)
    return root


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0, distinct: int = 32) -> list[str]:
    """count photo-like JPEGs (smooth colour fields plus sensor-like noise, ~q90) as folder/000000.jpg ...

    Only `distinct` are generated; the rest are byte copies, which decode exactly as slowly.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for _ in range(min(count, distinct)):
        coarse = Image.fromarray(rng.integers(0, 256, (max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        write_bytes(path, blobs[i % len(blobs)], "benchmark image", durable=False)  # scratch
        paths.append(str(path))
    return paths
