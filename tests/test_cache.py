"""The on-disk feature cache: values, staleness, resuming, training/evaluation from it, bounded memory."""
import logging
from multiprocessing.reduction import ForkingPickler  # how spawn-started DataLoader workers receive a dataset
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from captioner.jobs import evaluate, extract, train
from captioner.data.datasets import by_split, load_records
from captioner.data.cache import CachedFeatures, FeatureCache, default_cache_dir, open_valid_cache
from captioner.data.images import CaptionPairs, ImageFiles, load_image
from captioner.data.pipeline import Batches, image_batches
from captioner.engine.train.step import CaptionLoss
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel, build_encoder
from captioner.text import Vocabulary

from helpers import SMALL_MODEL, tiny_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The folder for _cfg's dataset: 30 synthetic images (24 train, 3 val, 3 test), generated there by the first
    command that loads it; read at 64x64, they give a 2x2 layer4 grid of 512 channels."""
    root = tmp_path_factory.mktemp("small")
    return root


def _cfg(root, *overrides):
    return tiny_config(root, "dataset.synthetic_images=30", *SMALL_MODEL, "decode.batch_size=8", *overrides)


def _encoder(cfg):
    return build_encoder(cfg.encoder)  # random init from encoder.seed, as extract and train build it


@pytest.mark.parametrize("dtype, rtol", [("bfloat16", 2 ** -8), ("float32", 1e-6)])
def test_round_trip_equals_running_the_encoder(small_data, tmp_path, dtype, rtol):
    # float32 compute: this checks the storage's rounding alone (bf16 compute is checked in test_compute.py)
    cfg = _cfg(small_data, f"cache.dir={tmp_path / 'cache'}", f"cache.dtype={dtype}", "compute.bf16=false")
    summary = extract.main(extract.ExtractJob(cfg, "train,val,test", device="cpu"))
    assert summary["added"] == 30 and summary["failed"] == 0 and summary["images"] == 30
    assert summary["bytes"] == 30 * 512 * 2 * 2 * (2 if dtype == "bfloat16" else 4)
    records = load_records(cfg.dataset)
    source, kept = FeatureCache.load(tmp_path / "cache").source(records)
    assert kept == records and len(source) == 30
    encoder = _encoder(cfg)
    images = torch.stack([load_image(r.path, 64) for r in records[:10]])
    expected = encoder(images)  # (10, 512, 2, 2) float32
    got = source[0:10]
    assert got.dtype == getattr(torch, dtype) and got.shape == expected.shape
    # bfloat16 keeps 8 bits of mantissa: relative error at most 2^-9 after rounding.
    assert torch.allclose(got.float(), expected, rtol=rtol, atol=1e-6 * expected.abs().max().item())
    assert torch.equal(source[3], got[3])


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_stale_cache_is_detected_and_refused(small_data, tmp_path, caplog):
    folder = tmp_path / "cache"
    cfg = _cfg(small_data, f"cache.dir={folder}")
    extract.main(extract.ExtractJob(cfg, "val", device="cpu"))
    for override, words in [("encoder.layer=layer3", "layer layer4 (now layer3)"),
                            ("encoder.image_size=96", "image_size 64 (now 96)"),
                            ("encoder.seed=1", "other encoder weights")]:  # random init from another seed
        other = _cfg(small_data, f"cache.dir={folder}", override)
        with pytest.raises(CaptionerError, match="--rebuild") as info:
            extract.main(extract.ExtractJob(other, "val", device="cpu"))
        assert words in str(info.value) and "\n" not in str(info.value)
        with caplog.at_level(logging.WARNING, logger="captioner"):
            assert open_valid_cache(other, _encoder(other), "train") is None
        assert words in caplog.text and "not used" in caplog.text
    with pytest.raises(CaptionerError, match="stores bfloat16"):
        extract.main(extract.ExtractJob(_cfg(small_data, f"cache.dir={folder}", "cache.dtype=float32"), "val", device="cpu"))
    rebuilt = extract.main(extract.ExtractJob(_cfg(small_data, f"cache.dir={folder}", "encoder.layer=layer3"), "val", device="cpu",
                           rebuild=True))
    assert rebuilt["added"] == 3 and FeatureCache.load(folder).header["layer"] == "layer3"


def test_default_folder_is_per_encoder_setting(small_data):
    assert default_cache_dir(_cfg(small_data)) == Path(small_data) / "features" / "resnet18-layer4-64"
    assert default_cache_dir(_cfg(small_data, "encoder.layer=layer3")).name == "resnet18-layer3-64"


def test_extraction_resumes_and_reports_unreadable_images(small_data, tmp_path, caplog):
    cfg = _cfg(small_data, f"cache.dir={tmp_path / 'cache'}")
    first = extract.main(extract.ExtractJob(cfg, "val", device="cpu"))
    assert first["added"] == 3
    # An interrupted run leaves rows that no index entry points to: they are dropped, not misread.
    with open(tmp_path / "cache" / "features.bin", "ab") as f:
        f.write(b"\x01" * 1000)
    records = load_records(cfg.dataset)
    test_records = by_split(records, "test")
    broken = Path(test_records[0].path)
    original = broken.read_bytes()
    broken.write_bytes(b"not a jpeg")
    try:
        with caplog.at_level(logging.WARNING, logger="captioner"):
            second = extract.main(extract.ExtractJob(cfg, "val,test", device="cpu"))
    finally:
        broken.write_bytes(original)
    assert second["skipped_existing"] == 3 and second["added"] == 2 and second["failed"] == 1
    assert broken.name in caplog.text and "cannot read" in caplog.text
    cache = FeatureCache.load(tmp_path / "cache")
    assert cache.num_rows == 5 and (tmp_path / "cache" / "features.bin").stat().st_size == 5 * cache.row_bytes
    source, kept = cache.source(test_records)  # the unreadable image is known, so the split counts as covered
    assert [r.image_id for r in kept] == [r.image_id for r in test_records[1:]]
    assert cache.source(by_split(records, "train")) is None  # not extracted: not covered
    third = extract.main(extract.ExtractJob(cfg, "test", device="cpu"))  # the image is readable again: retried
    assert third["added"] == 1 and third["failed"] == 0


def test_a_complete_cache_this_user_cannot_write_is_used_as_it_is(small_data, tmp_path, monkeypatch):
    """Another user's shared cache, read-only here: extract refused to start even with nothing to add. It now
    says so and writes nothing; a split the cache lacks is still the one-line refusal."""
    cfg = _cfg(small_data, f"cache.dir={tmp_path / 'cache'}")
    assert extract.main(extract.ExtractJob(cfg, "val", device="cpu"))["added"] == 3
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir()}

    def read_only(path, what, **kwargs):
        raise CaptionerError(f"cannot write {what} {path}: Permission denied")
    monkeypatch.setattr(extract, "check_writable", read_only)
    again = extract.main(extract.ExtractJob(cfg, "val", device="cpu"))
    assert again["added"] == 0 and again["skipped_existing"] == 3 and again["images"] == 3
    with pytest.raises(CaptionerError, match="Permission denied"):
        extract.main(extract.ExtractJob(cfg, "val,test", device="cpu"))  # the test split is not there
    with pytest.raises(CaptionerError, match="Permission denied"):
        extract.main(extract.ExtractJob(cfg, "val", device="cpu", rebuild=True))
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir()} == before


def test_corrupt_cache_gives_one_line(small_data, tmp_path):
    cfg = _cfg(small_data, f"cache.dir={tmp_path / 'cache'}")
    extract.main(extract.ExtractJob(cfg, "val", device="cpu"))
    index_path = tmp_path / "cache" / "index.json"
    index = index_path.read_text()
    index_path.write_text(index.replace("[0,", "[7,"))  # a row beyond the 3 written
    with pytest.raises(CaptionerError, match="index.json is damaged"):
        FeatureCache.load(tmp_path / "cache")
    index_path.write_text(index)
    with open(tmp_path / "cache" / "features.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CaptionerError, match="truncated"):
        FeatureCache.load(tmp_path / "cache")
    (tmp_path / "cache" / "header.json").write_text("{not json")
    with pytest.raises(CaptionerError, match="header.json is unreadable"):
        FeatureCache.load(tmp_path / "cache")


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_training_from_cache_gives_the_loss_of_training_from_images(small_data, tmp_path, dtype, rtol):
    cfg = _cfg(small_data, f"cache.dir={tmp_path / 'cache'}", f"cache.dtype={dtype}", "model.dropout=0",
               "compute.bf16=false")  # as the float32 model below runs
    extract.main(extract.ExtractJob(cfg, "train", device="cpu"))
    records = by_split(load_records(cfg.dataset), "train")
    vocab = Vocabulary.build([c for r in records for c in r.captions])
    model = CaptionModel(cfg.encoder, cfg.model, len(vocab), encoder=_encoder(cfg)).train()
    source, kept = FeatureCache.load(tmp_path / "cache").source(records)
    batches = []
    for input_source in (source, ImageFiles([r.path for r in records], 64)):
        pairs = CaptionPairs(kept, vocab, cfg.dataset.max_len, input_source)
        batch = next(iter(Batches(pairs, 16, torch.device("cpu"))))
        batches.append((batch.inputs, batch.captions, batch.lengths))
    assert torch.equal(batches[0][1], batches[1][1])  # the same captions, in the same order
    loss = CaptionLoss(model)  # training's own loss: encoder for images, none for cached features
    from_cache, from_images = (loss(*b)[0] for b in batches)
    assert torch.allclose(from_cache, from_images, rtol=rtol), (from_cache, from_images)


@pytest.mark.slow
def test_train_and_evaluate_read_a_valid_cache(small_data, tmp_path, caplog):
    cfg = _cfg(small_data, "train.epochs=1", "train.batch_size=32")  # the default folder under dataset.root
    extract.main(extract.ExtractJob(cfg, "train,val,test", device="cpu"))
    with caplog.at_level(logging.INFO, logger="captioner"):
        summary = train.main(train.TrainJob(cfg, tmp_path / "run", "cpu"))
    assert "train split: features of 24 images from cache" in caplog.text
    assert "val split: features of 3 images from cache" in caplog.text
    assert summary["steps"] == 2  # 24 images x 3 captions / 32, last partial batch dropped
    metrics = evaluate.main(evaluate.EvaluateJob(summary["best_checkpoint"], "test", beam_size=2, out_dir=str(tmp_path), device="cpu"))
    assert metrics["features"].startswith("cache ") and metrics["images"] == 3
    metrics = evaluate.main(evaluate.EvaluateJob(summary["best_checkpoint"], "test", beam_size=2, out_dir=str(tmp_path), device="cpu",
                            overrides=["cache.use=false"]))
    assert metrics["features"] == "encoder" and metrics["images"] == 3


@pytest.mark.slow
def test_cached_source_pickles_without_data_and_works_in_spawned_workers(small_data, tmp_path):
    cfg = _cfg(small_data, f"cache.dir={tmp_path / 'cache'}")
    extract.main(extract.ExtractJob(cfg, "val", device="cpu"))
    records = by_split(load_records(cfg.dataset), "val")
    source, _ = FeatureCache.load(tmp_path / "cache").source(records)
    expected = source[0:3]  # maps the file in this process
    sent = bytes(ForkingPickler.dumps(source))  # what a spawned worker is sent: the path, not the features
    copy = ForkingPickler.loads(sent)
    assert copy._array is None and len(sent) < 1000
    assert torch.equal(copy[0:3], expected)
    loader = DataLoader(source, batch_size=3, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(next(iter(loader)), expected)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_memory_follows_the_batch_not_the_cache(tmp_path):
    def private_mb():  # anonymous resident memory: what loading the cache into RAM would grow
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon"))
        return int(line.split()[1]) / 1024

    rows, shape = 2000, (512, 8, 8)  # 2000 x 64 KiB bfloat16 rows = 256 MiB, a sparse file
    path = tmp_path / "features.bin"
    with open(path, "wb") as f:
        f.truncate(rows * int(np.prod(shape)) * 2)
    source = CachedFeatures(path, shape, "bfloat16", list(range(rows)), rows)
    loader = DataLoader(source, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    before = private_mb()
    seen = sum(batch.shape[0] for batch in loader)
    assert seen == rows
    assert private_mb() - before < 64  # a whole-cache load would add 256 MiB


def test_gpu_decode_path_matches_pil(tmp_path):
    """The nvjpeg path's code, run with the CPU decoder: same pixels as PIL within resize rounding."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
        smooth.save(tmp_path / f"{i}.jpg", quality=90)
        paths.append(str(tmp_path / f"{i}.jpg"))
    Image.open(paths[0]).save(tmp_path / "p.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    paths += [str(tmp_path / "p.png"), str(tmp_path / "bad.jpg")]
    cpu = torch.device("cpu")
    (pil, _, pil_errors, *_), = list(image_batches(paths, 64, 8, 0, cpu))
    (gpu_path, index, errors, *_), = list(image_batches(paths, 64, 8, 0, cpu, gpu_decode=True))
    assert index.tolist() == list(range(5)) and errors[:4] == pil_errors[:4] == [""] * 4
    assert "bad.jpg" in errors[4] and "bad.jpg" in pil_errors[4]
    diff = (gpu_path[:3].int() - pil[:3].int()).abs().float()
    assert diff.mean() < 1.0 and diff.max() <= 8
    assert torch.equal(gpu_path[3], pil[3])  # not a JPEG: PIL decoded it in the worker
