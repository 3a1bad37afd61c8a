"""`torchrun --nproc_per_node=2` on CPU (gloo) trains like one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.data.datasets import by_split, load_records
from captioner.jobs import train

from helpers import ROOT, TINY, metric_lines, small_config, small_overrides, step_losses, weights


# softmax ignores a shift of all scores, so this bias gets only rounding noise as gradient, which Adam turns
# into lr-sized steps of either sign: it cannot match across batch splits and does not affect any output.
SHIFT_INVARIANT = {"decoder.attention.score.bias"}


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process_with_the_global_batch(tmp_path):
    data, ddp_dir, single_dir = tmp_path / "data", tmp_path / "ddp", tmp_path / "single"
    # dropout masks are drawn per process; float32: bf16 rounding differs between batch splits
    extra = ["model.dropout=0", "train.checkpoint_every=0", "compute.bf16=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "captioner", "-q",
         "train", "--config", str(TINY), "--run-dir", str(ddp_dir), "--device", "cpu",
         *small_overrides(data, *extra, "train.batch_size=8", "train.log_to=[jsonl,tensorboard]")],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"best_checkpoint"') == 1  # rank 0 alone prints the summary
    train.main(train.TrainJob(small_config(data, *extra, "train.batch_size=16"), single_dir, "cpu"))

    ddp, single = step_losses(ddp_dir), step_losses(single_dir)
    assert [s for s, _ in ddp] == [s for s, _ in single] == list(range(1, 19))  # one line per step: rank 0 logs
    assert max(abs(a - b) for (_, a), (_, b) in zip(ddp, single)) < 1e-5
    wd, ws = weights(ddp_dir / "last.pt"), weights(single_dir / "last.pt")
    for name in wd.keys() - SHIFT_INVARIANT:
        assert torch.allclose(wd[name], ws[name], atol=1e-4), name
    # validation: each process captions half of the val images, rank 0 gathers and scores all of them
    val = lambda d: [(x["val_images"], round(x["val_bleu4"], 6)) for x in metric_lines(d) if "val_bleu4" in x]  # noqa: E731
    assert val(ddp_dir) == val(single_dir) and val(ddp_dir)[0][0] == 6
    # rank 0 alone writes TensorBoard (one event file, each step once) and its share's sample captions (3 of 6)
    assert len(list((ddp_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert [len(x["samples"]) for x in metric_lines(ddp_dir) if "samples" in x] == [3, 3]
    state = torch.load(ddp_dir / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and not any(k.startswith("module.") for k in state["model"])


@pytest.mark.slow
def test_unreadable_images_of_every_process_are_counted_and_named(tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "ddp"
    overrides = small_overrides(data, "train.epochs=1", "train.checkpoint_every=0")
    val = by_split(load_records(small_config(data, "train.epochs=1").dataset), "val")  # generates the images
    broken = [val[0].path, val[1].path]  # validation is split rank::2: one in each process's share
    for path in broken:
        Path(path).write_bytes(b"not an image")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "captioner", "-q",
         "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu", *overrides],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["unreadable_images"] == 2
    for path in broken:  # rank 1's own warnings are silenced: rank 0 names its images
        assert f"skipped unreadable image: {path}" in done.stderr
