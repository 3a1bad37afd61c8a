"""`torchrun --nproc_per_node=2` on CPU (gloo): extract and caption give what one process gives, and a run
with one process killed by SIGKILL completes on the rerun with every image exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from captioner.data.datasets import load_records
from captioner.data.cache import FeatureCache, default_cache_dir, encoder_signature
from captioner.engine.runtime.compute import setup_compute
from captioner.engine.runtime.distributed import Process, shard
from captioner.engine.infer.extraction import extract_into, part_folder
from captioner.jobs import caption, extract
from captioner.model.caption_model import build_encoder
from captioner.engine.runtime.rng import seed_everything

from helpers import (ROOT, TINY, by_name, make_input_folder, noise_pngs, parse_gallery, read_records, tiny_config,
                     untrained_checkpoint)


def _torchrun(args: list[str], tag: str = "", wait: bool = True):
    """`torchrun --standalone --nproc_per_node=2 -m captioner -q ARGS` with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CAPTIONER_TEST_TAG": tag}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "captioner",
           "-q", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker with this RANK among the processes started with CAPTIONER_TEST_TAG=tag."""
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"CAPTIONER_TEST_TAG={tag}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_shards_cover_the_list_once():
    items = list(range(11))
    shards = [shard(items, Process(r, 3, r, torch.device("cpu"))) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert shard(items, Process(0, 1, 0, torch.device("cpu"))) == items


# ---------------------------------------------------------------- extract


def _extract_cfg(root, cache_dir):
    return tiny_config(root, "dataset.synthetic_images=30", "encoder.image_size=64", "decode.batch_size=4",
                       "cache.dtype=float32", "compute.bf16=false", f"cache.dir={cache_dir}")


@pytest.fixture(scope="module")
def broken_synthetic(tmp_path_factory):
    """30 synthetic images, one of them unreadable: its failure must be recorded the same way too."""
    root = tmp_path_factory.mktemp("synthetic")
    records = load_records(_extract_cfg(root, root / "unused").dataset)  # generates the images
    Path(records[7].path).write_bytes(b"not a jpeg")
    return root, records


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


@pytest.mark.slow
def test_two_process_extract_equals_one_process(broken_synthetic, tmp_path):
    root, records = broken_synthetic
    two, one = tmp_path / "two", tmp_path / "one"
    done = _torchrun(["extract", "--config", str(TINY), "--device", "cpu", "--workers", "0",
                      *[f"{k}={v}" for k, v in (("dataset.root", root), ("dataset.synthetic_images", 30),
                                                ("encoder.image_size", 64), ("decode.batch_size", 4),
                                                ("cache.dtype", "float32"), ("compute.bf16", "false"),
                                                ("cache.dir", two))]])
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 alone prints its summary
    assert done.stdout.count('"cache"') == 1
    assert summary["processes"] == 2 and summary["added"] == 29 and summary["failed"] == 1
    # Image 7 is in process 1's share (items 1, 3, 5, ...), whose own warnings are silenced: rank 0 names it.
    assert f"skipped unreadable image: {records[7].path}" in done.stderr
    single = extract.main(extract.ExtractJob(_extract_cfg(root, one), device="cpu", num_workers=0))
    assert single["added"] == 29 and single["failed"] == 1
    # The merge copies the parts in dataset order: the very same file and index as one process writes.
    assert _index(two) == _index(one) and os.path.realpath(records[7].path) in _index(two)["failed"]
    assert (two / "features.bin").read_bytes() == (one / "features.bin").read_bytes()
    assert not list(two.glob("part-*"))


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_parts_of_a_killed_extraction_are_kept_on_the_next_run(broken_synthetic, tmp_path):
    """A torchrun run killed part way leaves part caches; the next run (one process here) takes their rows in,
    extracts only the rest, and every image ends up once with the features a fresh one-process run gives."""
    root, records = broken_synthetic
    cfg = _extract_cfg(root, tmp_path / "resumed")
    seed_everything(cfg.train.seed)
    encoder = setup_compute(cfg.compute, torch.device("cpu")).prepare_encoder(build_encoder(cfg.encoder))
    signature = encoder_signature(encoder, cfg.encoder.weights)
    folder = default_cache_dir(cfg)
    FeatureCache.create(folder, signature, "float32").close()
    readable = [r for i, r in enumerate(records) if i != 7]
    for rank in range(2):  # each "rank" finished the first few images of its shard before the kill
        part = FeatureCache.create(part_folder(folder, rank), signature, "float32")
        extract_into(part, encoder, shard(readable, Process(rank, 2, rank, torch.device("cpu")))[:4], 4, 0,
                             torch.device("cpu"))
        part.close()
    resumed = extract.main(extract.ExtractJob(cfg, device="cpu", num_workers=0))
    assert resumed["skipped_existing"] == 8 and resumed["added"] == 21 and not list(folder.glob("part-*"))
    reference = tmp_path / "reference"
    extract.main(extract.ExtractJob(_extract_cfg(root, reference), device="cpu", num_workers=0))
    a, b = FeatureCache.load(folder), FeatureCache.load(reference)
    assert a.rows.keys() == b.rows.keys() and a.num_rows == b.num_rows == 29
    features_a, _ = a.source(readable)
    features_b, _ = b.source(readable)
    assert torch.equal(features_a[0:29], features_b[0:29])


# ---------------------------------------------------------------- caption


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> str:
    """An untrained tiny model at 64x64: the outputs' bookkeeping needs no good captions."""
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", "decode.max_len=6",
                                "encoder.image_size=64")


@pytest.mark.slow
def test_two_process_caption_equals_one_process_bad_files_included(small_checkpoint, tmp_path):
    folder = tmp_path / "photos"
    good, bad = make_input_folder(folder)
    args = ["caption", "--checkpoint", small_checkpoint, str(folder), "--batch-size", "4", "--workers", "0",
            "--beam", "2", "--device", "cpu"]
    two_out, two_html = tmp_path / "two.jsonl", tmp_path / "two.html"
    done = _torchrun([*args, "--out", str(two_out), "--html", str(two_html)])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["captioned"] == len(good) and summary["errors"] == summary["failed"] == len(bad)
    one_out, one_html = tmp_path / "one.jsonl", tmp_path / "one.html"
    caption.main(caption.CaptionJob(small_checkpoint, [str(folder)], str(one_out), 2, 4, device="cpu", num_workers=0,
                 html=str(one_html)))
    two, one = by_name(read_records(two_out)), by_name(read_records(one_out))
    assert sorted(two) == sorted(one) == sorted([*good, *bad])
    for name, record in one.items():
        assert two[name].keys() == record.keys(), name
        assert two[name].get("caption") == record.get("caption") and two[name].get("error") == record.get("error")
        assert two[name].get("score") == pytest.approx(record.get("score"), abs=1e-3)
    # One gallery, the same entries with the same words; no part file left behind.
    pages = parse_gallery(two_html), parse_gallery(one_html)
    assert pages[0].entries == pages[1].entries and pages[0].errors == pages[1].errors
    assert two_html.read_text().count("<footer") == 1
    assert not list(tmp_path.glob("*.part-*"))


@pytest.mark.slow
def test_a_killed_rank_then_a_rerun_captions_every_image_once(small_checkpoint, tmp_path):
    folder = noise_pngs(tmp_path / "many", 160, 40, broken_jpeg=True)
    out, html = tmp_path / "captions.jsonl", tmp_path / "gallery.html"
    args = ["caption", "--checkpoint", small_checkpoint, str(folder), "--out", str(out), "--html", str(html),
            "--batch-size", "1", "--workers", "0", "--beam", "1", "--device", "cpu"]
    tag = uuid.uuid4().hex
    run = _torchrun(args, tag, wait=False)
    part = tmp_path / "captions.jsonl.part-00001"
    deadline = time.time() + 400  # three processes importing torch on a loaded machine can take minutes
    while time.time() < deadline and run.poll() is None and (not part.exists() or part.read_text().count("\n") < 5):
        time.sleep(0.05)
    pid = _rank_pid(tag, 1)
    if pid is None or run.poll() is not None or not part.exists():
        run.kill()
        _, stderr = run.communicate()
        pytest.fail(f"rank 1 should be running with a part file; torchrun said: {stderr[-2000:]}")
    os.kill(pid, signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0, "torchrun reports the killed rank"
    assert part.exists() and 5 <= part.read_text().count("\n") < 81, "rank 1 was killed part way"

    done = _torchrun(args)  # the same command again
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    names = sorted([f"img{i:03d}.png" for i in range(160)] + ["broken.jpg"])
    records = by_name(read_records(out))  # asserts no duplicates
    assert sorted(records) == names and "error" in records["broken.jpg"]
    assert summary["skipped"] >= 5 and summary["skipped"] + summary["captioned"] + summary["errors"] == len(names)
    page = parse_gallery(html)
    shown = [*page.entries, *page.errors]
    assert sorted(map(os.path.basename, shown)) == names and len(shown) == len(set(shown))
    assert html.read_text().count("<footer") == 1 and not list(tmp_path.glob("*.part-*"))
