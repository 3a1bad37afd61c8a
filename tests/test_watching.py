"""Watching training: TensorBoard holds exactly metrics.jsonl's scalars plus sample captions and attention strips,
also after a kill -9 and --resume; the whole-run progress line and ETA; `captioner plot` over several runs."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main as cli
from captioner.engine.train.telemetry import RunClock, duration
from captioner.jobs import train

from helpers import ROOT, TINY, killed_child, metric_lines, sigterm_after_step, small_config, small_overrides

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

# 60 synthetic images at val_fraction 0.15: 42 train images (7 steps of 16 captions per epoch) and 9 val images,
# so that all 8 sample images are there.
WATCHED = ["dataset.val_fraction=0.15", "train.log_to=[jsonl,tensorboard]"]


def _expected_scalars(run_dir) -> dict:
    """{tag: [(step, value as float32)]} from metrics.jsonl, by the documented rule: every number of a step
    line as train/KEY, of a validation line as epoch/KEY (step and epoch are where, not what)."""
    expected = {}
    for record in metric_lines(run_dir):
        if "loss" in record or "val_cider" in record:
            kind = "epoch" if "val_cider" in record else "train"
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    expected.setdefault(f"{kind}/{key}", []).append((record["step"], np.float32(value)))
    return expected


def _accumulator(run_dir):
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def _tensorboard_scalars(acc) -> dict:
    return {tag: [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(run_dir, folder="tb") -> dict:
    """{tag: [steps]} straight from the event files, without the reader's purge logic."""
    steps = {}
    for path in sorted((run_dir / folder).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def _check_tensorboard_equals_metrics(run_dir, validations: int):
    acc = _accumulator(run_dir)
    expected = _expected_scalars(run_dir)
    assert _tensorboard_scalars(acc) == expected  # every scalar: same names, same steps, same values
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/captions_per_s", "train/data_s",
                "train/compute_s", "epoch/val_cider", "epoch/val_bleu4", "epoch/train_loss"):
        assert tag in expected
    for tag, steps in _raw_steps(run_dir).items():  # the files themselves hold every step once
        assert len(steps) == len(set(steps)), (tag, steps)

    lines = metric_lines(run_dir)
    validation_steps = [x["step"] for x in lines if "val_cider" in x]
    sampled = [x for x in lines if "samples" in x]
    assert [x["step"] for x in sampled] == validation_steps and len(validation_steps) == validations
    texts = sorted(t for t in acc.Tags()["tensors"] if t.startswith("samples/"))
    images = sorted(acc.Tags()["images"])
    assert texts == [f"samples/{i}/text_summary" for i in range(8)] and images == [f"attention/{i}" for i in range(8)]
    for i in range(8):
        shown = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"samples/{i}/text_summary")]
        assert [s for s, _ in shown] == validation_steps
        for (_, text), record in zip(shown, sampled):
            sample = record["samples"][i]
            assert f"**{sample['caption'] or '(empty)'}** (beam 3)" in text and sample["file"] in text
            assert all(reference in text for reference in sample["references"])
        strips = acc.Images(f"attention/{i}")
        assert [e.step for e in strips] == validation_steps
        picture = np.asarray(Image.open(io.BytesIO(strips[-1].encoded_image_string)))
        assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[1] > picture.shape[0] > 50
        assert picture.std() > 10  # a picture, not a blank
    hparams = acc.PluginTagToContent("hparams")
    assert b"train.lr" in hparams["_hparams_/session_start_info"]
    assert b"epoch/val_cider" in hparams["_hparams_/experiment"]


@pytest.mark.slow
def test_tensorboard_holds_every_scalar_of_metrics_jsonl_and_8_samples_per_validation(small_root, tmp_path):
    run_dir = tmp_path / "watched"
    summary = train.main(train.TrainJob(small_config(small_root, *WATCHED), run_dir, "cpu"))
    assert summary["steps"] == 14 and summary["epochs"] == 2
    _check_tensorboard_equals_metrics(run_dir, validations=2)
    assert {f"train/{k}" for k in ("loss", "elapsed_s")} <= set(_expected_scalars(run_dir))


# The child SIGKILLs itself once step 5 is logged by every logger and flushed to disk: two steps after the step-3
# checkpoint, so metrics.jsonl and tb/ both hold steps the resume must drop.
KILLED_CHILD = killed_child(5, logger="RunLog", flush=True)


@pytest.mark.slow
def test_after_kill_and_resume_each_step_is_logged_once(small_root, tmp_path, capsys, caplog):
    run_dir = tmp_path / "killed"
    args = ["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu",
            *small_overrides(small_root, *WATCHED)]
    done = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(torch.get_num_threads()), *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 3
    assert max(_raw_steps(run_dir)["train/loss"]) == 5  # logged past the checkpoint, on disk
    with caplog.at_level("INFO", logger="captioner"):
        assert cli(["train", "--resume", str(run_dir), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 2 and epoch_lines[0].startswith("epoch 1/2: ") and " · ETA " in epoch_lines[0]
    assert epoch_lines[-1].endswith(" · ETA 0s")
    assert "step 14/14" not in err  # stderr is no terminal here: no progress line
    assert [x["step"] for x in metric_lines(run_dir) if "loss" in x] == list(range(1, 15))
    _check_tensorboard_equals_metrics(run_dir, validations=2)
    assert _raw_steps(run_dir)["train/loss"] == list(range(1, 15))
    times = [x["elapsed_s"] for x in metric_lines(run_dir) if "loss" in x]
    assert times == sorted(times)  # the run's clock goes on from the checkpoint's time


@pytest.mark.slow
def test_scst_run_turning_tensorboard_on_at_resume_gets_its_whole_history(small_root, tmp_path, monkeypatch):
    """An SCST run logs to metrics.jsonl only, is stopped by SIGTERM, and is resumed with TensorBoard on: tb/
    then holds every step from 1, SCST's reward, baseline and sample length included."""
    run_dir = tmp_path / "scst"
    scst = ["dataset.val_fraction=0.15", "train.objective=scst", "train.batch_size=8", "train.scst_samples=3",
            "train.epochs=2", "train.checkpoint_every=2"]  # 42 train images: 5 steps of 8 images per epoch
    restore_log = sigterm_after_step(monkeypatch, 7)
    assert train.main(train.TrainJob(small_config(small_root, *scst), run_dir, "cpu"))["stopped"] == "SIGTERM"
    restore_log()
    assert not (run_dir / "tb").exists()
    resumed = small_config(small_root, *scst, "train.log_to=[jsonl,tensorboard]")
    assert train.main(train.TrainJob(resumed, run_dir, "cpu", resume=True))["steps"] == 10
    acc = _accumulator(run_dir)
    scalars = _tensorboard_scalars(acc)
    assert scalars == _expected_scalars(run_dir) and [s for s, _ in scalars["train/loss"]] == list(range(1, 11))
    for tag in ("train/reward", "train/baseline", "train/sample_words", "train/images_per_s", "epoch/train_reward"):
        assert tag in scalars
    texts = acc.Tensors("samples/0/text_summary")
    assert [e.step for e in texts] == [5, 10]  # the first one replayed as text
    assert all("** (beam 3)" in e.tensor_proto.string_val[0].decode() for e in texts)  # how it was decoded, too
    assert [e.step for e in acc.Images("attention/0")] == [10]  # its strip could not be redrawn


def test_drop_events_after_keeps_each_file_up_to_the_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from captioner.engine.train.loggers import drop_events_after
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 11):
            writer.add_scalar("train/loss", 1.0 / step, step)
        writer.add_text("samples/0", "a caption", 10)
    (path,) = tmp_path.glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes() + b"\x10\x00\x00")  # a record torn by kill -9
    assert drop_events_after(tmp_path, 6) == 5  # steps 7..10 and the text at 10; the torn record is cut too
    assert _raw_steps(tmp_path, folder=".") == {"train/loss": [1, 2, 3, 4, 5, 6]}
    assert drop_events_after(tmp_path, 6) == 0  # nothing after the step: the file stays as it is


def test_tensorboard_missing_is_one_line_before_training(small_root, tmp_path, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else find_spec(name, *a))
    code = cli(["train", "--config", str(TINY), "--run-dir", str(tmp_path / "run"),
                *small_overrides(small_root, *WATCHED)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'pip install "captioner[tensorboard]"' in err[0]
    assert not (tmp_path / "run").exists()


def test_log_to_is_checked_when_the_config_is_read(small_root):
    assert small_config(small_root).train.log_to == ["jsonl"]
    assert small_config(small_root, "train.log_to=jsonl,tensorboard").train.log_to == ["jsonl", "tensorboard"]
    with pytest.raises(Exception, match="train.log_to takes each of jsonl, tensorboard, mlflow, wandb"):
        small_config(small_root, "train.log_to=[jsonl,comet]")
    with pytest.raises(Exception, match="at most once"):
        small_config(small_root, "train.log_to=[jsonl,mlflow,mlflow]")


def test_attention_strip_shades_as_the_gallery_page_does():
    from captioner.engine.outputs.gallery import DIMMING, PANEL, attention_strip
    image = np.full((224, 224, 3), 200, dtype=np.uint8)
    alphas = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])  # "left": top-left region; "all": even
    strip = attention_strip(image, (640, 640), ["left", "all"], alphas, grid=(2, 2))
    gap = 6  # between panels: the image, then one panel per word
    left = strip[gap:gap + PANEL, 2 * gap + PANEL:2 * gap + 2 * PANEL].astype(float)  # (112, 112, 3)
    even = strip[gap:gap + PANEL, 3 * gap + 2 * PANEL:3 * gap + 3 * PANEL].astype(float)
    assert strip.shape[1] == 4 * gap + 3 * PANEL and strip.dtype == np.uint8
    assert abs(left[10, 10].mean() - 200) < 3  # the attended region is lit
    assert abs(left[-10, -10].mean() - 200 * (1 - DIMMING)) < 3  # the others shaded by DIMMING
    assert np.abs(even - 200).max() < 3  # even attention: every region lit, as on the page


def test_sample_captions_are_the_ones_validation_scored_with_its_beam_and_their_attention(tmp_path):
    """The samples decode with validation's settings (train.val_beam_size, following decode.beam_size=2 here):
    each sample's caption is validation's caption of that image, and beam search still gives each word its
    attention over the grid."""
    from dataclasses import replace
    from types import SimpleNamespace
    from captioner.data.pipeline import Unreadable
    from captioner.data.records import ImageRecord
    from captioner.engine.infer.checkpoint import load_checkpoint, model_from_checkpoint
    from captioner.engine.infer.predict import predict
    from captioner.engine.runtime.compute import setup_compute
    from captioner.engine.train.inputs import TrainingInputs
    from captioner.engine.train.loggers.tensorboard_log import _sample_text
    from captioner.engine.train.samples import SampleImages
    from captioner.engine.train.validation import validation_settings
    from helpers import noise_pngs, varied_checkpoint

    model, vocab, cfg = model_from_checkpoint(load_checkpoint(varied_checkpoint(tmp_path / "m.pt")))
    assert cfg.train.val_beam_size == 2  # 0 in the config: decode.beam_size's
    device = torch.device("cpu")
    run = SimpleNamespace(cfg=cfg, model=model, vocab=vocab, process=SimpleNamespace(device=device),
                          compute=setup_compute(cfg.compute, device))
    folder = noise_pngs(tmp_path / "images", 5, 64)
    records = [ImageRecord(i, str(folder / f"img{i:03d}.png"), ["a caption"], "val") for i in range(5)]
    inputs = TrainingInputs(None, [], None, records, 0, Unreadable())
    samples = SampleImages(inputs, {r.image_id: r.captions for r in records}, count=4).caption(run)

    scored = predict(model, vocab, records, validation_settings(run), 4, device, progress_bar=False)
    assert [s.caption for s in samples] == [scored[i] for i in range(4)]
    greedy = predict(model, vocab, records, replace(validation_settings(run), beam_size=1), 4, device,
                     progress_bar=False)
    assert [greedy[i] for i in range(4)] != [scored[i] for i in range(4)]  # the beam decides here: a real check
    assert all(s.decoding == "beam 2" and "** (beam 2)" in _sample_text(s) for s in samples)
    for s in samples:
        assert s.words and s.caption == " ".join(s.words)
        assert s.alphas.shape == (len(s.words), 9) and np.allclose(s.alphas.sum(axis=1), 1, atol=1e-4)


class _Progress:
    step, epoch, elapsed_s = 100, 1, 50.0


def test_run_clock_line_and_eta(monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr("captioner.engine.train.telemetry.time.perf_counter", lambda: now[0])
    monkeypatch.setattr("captioner.progress.show_progress", lambda: True)  # as on a terminal
    with RunClock(_Progress(), total_steps=400, epochs=4, items="captions") as clock:
        for step in range(101, 111):  # 2 s per step of 64 captions
            now[0] += 2.0
            clock.stepped(step, 2, 64)
        assert clock.eta(epochs_done=1) == pytest.approx(290 * 2.0)  # no validation timed yet
        now[0] += 30.0
        clock.validated(30.0)
        assert clock.eta(epochs_done=2) == pytest.approx(290 * 2.0 + 2 * 30.0)
        now[0] += 5.0  # checkpoints at the epoch's end: part of the epoch end's time, not a training step's
        clock.start_epoch()
        assert clock.eta(epochs_done=2) == pytest.approx(290 * 2.0 + 2 * 35.0)
        assert clock.elapsed() == pytest.approx(50.0 + 55.0)
        # 290 steps x 2 s + 3 epoch ends (epochs 2, 3, 4) x 35 s
        assert clock.line() == "step 110/400 · epoch 2/4 · 32 captions/s · ETA 11m25s"
    err = capsys.readouterr().err
    assert "step 110/400 · epoch 2/4 · 32 captions/s · ETA" in err and "done in" not in err  # 290 steps to go
    assert [duration(s) for s in (0, 45, 725, 11520, 3 * 86400 + 4000)] == ["0s", "45s", "12m05s", "3h12m", "3d01h"]


def test_run_clock_draws_nothing_when_not_shown(monkeypatch, capsys):
    monkeypatch.setattr("captioner.progress.show_progress", lambda: False)  # -q, or stderr not a terminal
    with RunClock(_Progress(), total_steps=400, epochs=4) as clock:
        clock.stepped(101, 2, 64)
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # several seconds: the fast subset stays under a minute
def test_plot_one_run_keeps_its_figure_and_several_runs_overlay(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 0.8)):
        folder = tmp_path / name
        folder.mkdir()
        lines = [{"step": s, "epoch": 1 + s // 10, "loss": scale * 5 / s, "lr": 1e-3, "elapsed_s": 2.0 * s}
                 for s in range(1, 21)]
        lines += [{"epoch": e, "step": 10 * e, "train_loss": 1.0, "val_cider": scale * 0.3 * e, "val_bleu4": 0.1,
                   "select_metric": "cider", "elapsed_s": 20.0 * e + 5} for e in (1, 2)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert cli(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plot"] == str(tmp_path / "both.png") and result["runs"] == ["a", "b"]
    assert result["steps"] == [20, 20] and result["validations"] == [2, 2]
    picture = Image.open(tmp_path / "both.png")
    assert picture.width > picture.height > 400
    assert cli(["plot", str(tmp_path / "a")]) == 0  # one run: its own figure, in the run dir
    assert (tmp_path / "a" / "curves.png").is_file()
    assert cli(["plot", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_curve_of_one_point_is_drawn_as_a_point():
    """A run stopped after its first logged step has one loss: a line through it draws nothing."""
    from captioner.jobs.plot import _lone_point
    assert _lone_point([10]) == "o" and _lone_point([10, 20]) is None and _lone_point([]) is None


def test_plot_names_how_validation_decoded():
    """The validation panel said "(greedy)" on every run, also where validation ran beam 3 (the default,
    train.val_beam_size 0 -> decode.beam_size); it now takes the decoding the run's sample captions record."""
    from captioner.jobs.plot import validation_title
    val = {"epoch": 1, "step": 10, "val_cider": 0.3}
    samples = {"step": 10, "epoch": 1, "samples": [{"file": "a.jpg", "caption": "a dog", "decoding": "beam 3"}]}
    assert validation_title([val, samples]) == "validation (beam 3)"
    greedy = {**samples, "step": 20, "samples": [{"caption": "a cat", "decoding": "greedy"}]}
    assert validation_title([val, samples, greedy]) == "validation (greedy)"  # the latest, as resumed with
    assert validation_title([val]) == "validation"  # a run from before samples were logged: nothing claimed


def test_a_resumed_run_waits_until_its_event_file_sorts_after_the_killed_runs(tmp_path):
    # A killed run's file opened this second, by a process whose pid sorts after ours: a file we open in the same
    # second would sort first, and TensorBoard would read our later steps before its earlier ones.
    from captioner.engine.train.loggers import wait_for_a_later_file_name
    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.99999.0").write_bytes(b"")
    wait_for_a_later_file_name(tmp_path)
    assert int(time.time()) > now
    started = time.monotonic()
    wait_for_a_later_file_name(tmp_path)  # already later: no wait
    assert time.monotonic() - started < 0.05
