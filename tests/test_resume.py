"""Exact resume: a run killed with SIGKILL mid-epoch (or stopped by SIGTERM) and resumed repeats an
uninterrupted run: the same per-step losses in metrics.jsonl and the same final weights."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from captioner.jobs import train
from captioner.cli import main as cli

from helpers import (ROOT, TINY, killed_child, metric_lines, sigterm_after_step, small_config, small_overrides,
                     step_losses, weights)

pytestmark = pytest.mark.slow  # every test trains the small model (18 steps) at least once


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_root):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = train.main(train.TrainJob(small_config(small_root), run_dir, "cpu"))
    assert summary["steps"] == 18 and summary["epochs"] == 2 and summary["stopped"] is None
    return run_dir


def _same_run(a, b):
    assert step_losses(a) == step_losses(b)  # exact floats, every step 1..18
    assert [s for s, _ in step_losses(b)] == list(range(1, 19))  # no step lost or logged twice
    wa, wb = weights(a / "last.pt"), weights(b / "last.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    val = lambda d: [(x["step"], x["val_bleu4"], x["train_loss"]) for x in metric_lines(d) if "val_bleu4" in x]  # noqa: E731
    assert val(a) == val(b) and len(val(a)) == 2


# The child SIGKILLs itself right after logging step 8: mid-epoch 1 (9 steps), two steps after the step-6
# checkpoint, so metrics.jsonl holds lines the resume must drop.
KILLED_CHILD = killed_child(8)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(uninterrupted, small_root, tmp_path):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
            *small_overrides(small_root)]
    done = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(torch.get_num_threads()), *args], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert [s for s, _ in step_losses(run_dir)][-1] == 8  # logged past the checkpoint ...
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["progress"]["epoch"] == 0 and state["progress"]["sample"] == 6 * 16
    assert cli(["-q", "train", "--resume", str(run_dir), "--device", "cpu"]) == 0  # ... and resumed from step 6
    _same_run(uninterrupted, run_dir)
    events = [x for x in metric_lines(run_dir) if x.get("event") == "resume"]
    assert events == [{"event": "resume", "step": 6, "epoch": 0, "processes": 1}]


def test_sigterm_saves_last_and_exits_cleanly_then_resumes(uninterrupted, small_root, tmp_path, monkeypatch,
                                                           capsys):
    run_dir = tmp_path / "terminated"
    restore_log = sigterm_after_step(monkeypatch, 12)  # lands during step 13 (epoch 2), handled after it
    code = cli(["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
                *small_overrides(small_root)])
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert "stopped by SIGTERM at step 13; last.pt saved" in err[-1] and "--resume" in err[-1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are given back
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["step"] == 13 and state["progress"]["epoch"] == 1
    restore_log()
    # Same command again (no --resume): the folder holds this very run, so it is resumed.
    assert cli(["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
                *small_overrides(small_root)]) == 0
    _same_run(uninterrupted, run_dir)


def test_resume_a_finished_run_to_train_longer(uninterrupted, tmp_path):
    run_dir = tmp_path / "longer"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # a save that kill -9 interrupted
    assert cli(["-q", "train", "--resume", str(run_dir), "--device", "cpu", "train.epochs=3"]) == 0
    assert not list(run_dir.glob("*.tmp"))
    assert [s for s, _ in step_losses(run_dir)] == list(range(1, 28))
    assert torch.load(run_dir / "last.pt", weights_only=True)["config"]["train"]["epochs"] == 3


def test_plot_writes_a_png_of_the_curves(uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    assert cli(["plot", str(run_dir)]) == 0
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert '"steps": 18, "validations": 2' in capsys.readouterr().out
    assert cli(["plot", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_validation_says_so_in_strict_json(small_root, tmp_path, monkeypatch,
                                                                          capsys):
    sigterm_after_step(monkeypatch, 2)
    run_dir = tmp_path / "early"
    code = cli(["train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
                *small_overrides(small_root)])
    assert code == 128 + signal.SIGTERM and not (run_dir / "best.pt").exists()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the summary: not JSON"))
    assert summary["best_checkpoint"] is None and summary["best_score"] is None and summary["best_bleu4"] is None
    assert summary["last_checkpoint"] == str(run_dir / "last.pt") and summary["stopped"] == "SIGTERM"
