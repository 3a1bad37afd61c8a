"""`captioner demo` never loses work: Ctrl-C/SIGTERM in training stops it (130/143) and a rerun resumes the run;
a folder holding a finished demo is refused without --overwrite, its files untouched."""
import json
import signal

import pytest
import torch

from captioner.cli import main as cli
from captioner.engine.train.loggers import MetricsLog
from captioner.jobs import train

from helpers import SMALL, metric_lines

# SMALL's 2 epochs of 9 steps on 60 synthetic images under the demo's own data folder; short decoding.
FAST = [*SMALL, "decode.max_len=8"]


def _files(folder):
    """path -> (bytes, mtime_ns) of every file under folder."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _finished_demo(out):
    """A folder as a finished demo leaves it (the files' contents do not matter to the refusal)."""
    (out / "run").mkdir(parents=True)
    for name in ("best.pt", "last.pt", "metrics.jsonl", "config.yaml"):
        (out / "run" / name).write_text(name)
    (out / "demo.json").write_text(json.dumps({"bleu4": 0.55, "checkpoint": str(out / "run" / "best.pt")}))


def test_a_finished_demo_is_refused_in_one_line_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo2"
    _finished_demo(out)
    before = _files(out)
    monkeypatch.setattr(train, "main", lambda job: pytest.fail("a finished demo was trained again"))
    assert cli(["-q", "demo", "--out", str(out), "--device", "cpu", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished demo (its BLEU-4 0.550)" in err[0] and "--overwrite" in err[0], err
    assert _files(out) == before


def _stop_at_step(monkeypatch, step, signum):
    write = MetricsLog.write

    def write_then_signal(self, record):  # the signal lands during the next step, handled after it
        write(self, record)
        if record.get("step") == step and "loss" in record:
            signal.raise_signal(signum)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    return write


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_demo_exits_at_once_and_a_rerun_resumes_it(signum, tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    args = ["-q", "demo", "--out", str(out), "--device", "cpu", *FAST]
    write = _stop_at_step(monkeypatch, 12, signum)  # epoch 2 of 2
    assert cli(args) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step 13; last.pt saved" in err[-1] and f"captioner demo --out {out}" in err[-1]
    assert torch.load(out / "run" / "last.pt", weights_only=True)["step"] == 13
    assert not (out / "eval").exists() and not (out / "demo.json").exists()  # nothing evaluated or captioned

    monkeypatch.setattr(MetricsLog, "write", write)
    assert cli(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stopped"] is None and (out / "demo.json").is_file() and (out / "gallery.html").is_file()
    lines = metric_lines(out / "run")
    assert [x for x in lines if x.get("event") == "resume"] == [{"event": "resume", "step": 13, "epoch": 1,
                                                                 "processes": 1}]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == sorted(set(steps)) and steps[-1] == 18  # continued from 13, not restarted


@pytest.mark.slow
def test_a_finished_demo_reruns_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["-q", "demo", "--out", str(out), "--device", "cpu", *FAST]
    assert cli(args) == 0
    capsys.readouterr()
    before = _files(out)
    assert cli(args) == 2  # the real finished demo: refused, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished demo" in err[0], err
    assert _files(out) == before
    assert cli([*args, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stopped"] is None
    lines = metric_lines(out / "run")
    assert not [x for x in lines if x.get("event") == "resume"]  # trained afresh
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 19))
