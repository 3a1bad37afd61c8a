"""train.ema_decay: an exponential moving average of the trained weights is what validation scores and what
checkpoints hold as "model"; training steps the raw weights, which checkpoints keep so a resumed run repeats an
uninterrupted one exactly."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from captioner.cli import main as cli
from captioner.config import load_config
from captioner.engine.train.averaging import WeightAverage
from captioner.errors import CaptionerError
from captioner.jobs import train

from helpers import ROOT, TINY, killed_child, metric_lines, small_config, small_overrides


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen part (the encoder): not averaged
    return model


def test_the_average_follows_the_warmed_up_decay_over_trainable_weights_only():
    model = _model()
    average = WeightAverage(model, 0.9)
    start = model[1].weight.detach().clone()
    expected = start.clone()
    for n in range(100):
        with torch.no_grad():
            model[1].weight.add_(1.0)
        decay = min(0.9, (1 + n) / (10 + n))
        assert average.current_decay() == pytest.approx(decay)
        average.update(model)
        expected = decay * expected + (1 - decay) * model[1].weight.detach()
    assert torch.allclose(average.shadow["1.weight"], expected, atol=1e-5)
    assert set(average.shadow) == {"1.weight", "1.bias"}  # the frozen layer is not copied
    # warm-up: early steps count more than a fixed 0.9 would let them (decay 0.1 at the first step)
    assert average.updates == 100 and average.current_decay() == pytest.approx(0.9)


def test_applied_swaps_the_average_in_and_the_raw_weights_back_even_on_error():
    model = _model()
    average = WeightAverage(model, 0.5)
    with torch.no_grad():
        model[1].weight.add_(10.0)
    average.update(model)
    raw = model[1].weight.detach().clone()
    with average.applied(model):
        assert torch.equal(model[1].weight, average.shadow["1.weight"]) and not torch.equal(model[1].weight, raw)
    assert torch.equal(model[1].weight, raw)
    with pytest.raises(KeyboardInterrupt), average.applied(model):
        raise KeyboardInterrupt
    assert torch.equal(model[1].weight, raw) and model[1].weight.requires_grad


def test_checkpoint_fields_resume_the_raw_weights_and_the_count():
    model = _model()
    average = WeightAverage(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            model[1].weight.mul_(2.0)
        average.update(model)
    fields = average.checkpoint_fields(model)
    assert torch.equal(fields["model"]["1.weight"], average.shadow["1.weight"])
    assert torch.equal(fields["model"]["0.weight"], model[0].weight)  # frozen: the model's own
    assert torch.equal(fields["raw_weights"]["1.weight"], model[1].weight)
    assert fields["weight_average"] == {"decay": 0.9, "updates": 3}

    other = _model()
    other.load_state_dict(fields["model"])  # what a resumed run loads first: the checkpoint's "model"
    again = WeightAverage(other, 0.9)
    again.resume(other, fields, "last.pt")
    assert torch.equal(other[1].weight, model[1].weight) and again.updates == 3
    assert torch.equal(again.shadow["1.weight"], average.shadow["1.weight"])
    with pytest.raises(CaptionerError, match="last.pt: its raw_weights do not fit"):
        again.resume(other, {**fields, "raw_weights": {"1.weight": model[1].weight}}, "last.pt")


def test_ema_decay_out_of_range_is_refused_with_what_is_valid():
    with pytest.raises(CaptionerError, match=r"train.ema_decay must be in \[0, 1\).*got 1.0"):
        load_config(TINY, ["train.ema_decay=1.0"])
    assert load_config(TINY, []).train.ema_decay == 0.0  # off unless asked (docs/quality.md)


@pytest.mark.slow
def test_averaged_run_validates_the_average_and_resumes_exactly_after_kill(small_root, tmp_path):
    """With train.select_best false too (the real-photo recipe): best.pt is the last epoch's averaged weights."""
    uninterrupted = tmp_path / "whole"
    summary = train.main(train.TrainJob(small_config(small_root, "train.ema_decay=0.9", "train.select_best=false"),
                                        uninterrupted, "cpu"))
    assert summary["steps"] == 18 and summary["stopped"] is None
    state = torch.load(uninterrupted / "last.pt", weights_only=True)
    best = torch.load(uninterrupted / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and all(torch.equal(best["model"][k], state["model"][k]) for k in state["model"])
    epochs = [x for x in metric_lines(uninterrupted) if "val_cider" in x]
    assert [x["improved"] for x in epochs] == [True, True]  # best.pt written at every epoch
    assert summary["best_score"] == epochs[-1]["val_cider"]  # the summary speaks of best.pt's weights
    assert state["weight_average"] == {"decay": 0.9, "updates": 18}
    trained = [k for k in state["raw_weights"]]
    assert trained and any(not torch.equal(state["model"][k], state["raw_weights"][k]) for k in trained)
    # `evaluate` of the checkpoint scores the averaged weights: the numbers validation logged for that epoch
    scores = [x for x in metric_lines(uninterrupted) if "val_bleu4" in x]
    out = tmp_path / "eval"
    assert cli(["-q", "evaluate", "--checkpoint", str(uninterrupted / "last.pt"), "--split", "val", "--device",
                "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "metrics_val.json").read_text())["bleu4"] == pytest.approx(scores[-1]["val_bleu4"], abs=1e-9)

    run_dir = tmp_path / "killed"
    args = ["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
            *small_overrides(small_root), "train.ema_decay=0.9", "train.select_best=false"]
    done = subprocess.run([sys.executable, "-c", killed_child(8), str(torch.get_num_threads()), *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert torch.load(run_dir / "last.pt", weights_only=True)["weight_average"]["updates"] == 6
    assert cli(["-q", "train", "--resume", str(run_dir), "--device", "cpu"]) == 0
    resumed = torch.load(run_dir / "last.pt", weights_only=True)
    for field in ("model", "raw_weights"):
        assert all(torch.equal(state[field][k], resumed[field][k]) for k in state[field])
    assert [x["val_bleu4"] for x in metric_lines(run_dir) if "val_bleu4" in x] == [x["val_bleu4"] for x in scores]
