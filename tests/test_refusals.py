"""Every refusal is one line on stderr, exit code 2, and leaves the run directory exactly as it was."""
import shutil

import pytest
import torch

from captioner.jobs import train
from captioner.engine.infer.checkpoint import save_checkpoint
from captioner.cli import main as cli

from helpers import TINY, small_config, small_overrides


QUICK = ["train.epochs=1", "train.batch_size=48"]  # 3 steps


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_root):
    run_dir = tmp_path_factory.mktemp("finished")
    train.main(train.TrainJob(small_config(small_root, *QUICK), run_dir, "cpu"))
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(capsys, argv, folder, *expected):
    before = _snapshot(folder) if folder.exists() else None
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("captioner train: error: "), err
    for text in expected:
        assert text in err[0], err[0]
    assert (_snapshot(folder) if folder.exists() else None) == before  # nothing written, nothing removed
    return err[0]


def test_truncated_checkpoint_is_refused(run_dir, capsys):
    data = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(data[: len(data) // 3])
    _refused(capsys, ["train", "--resume", str(run_dir)], run_dir, "last.pt is truncated or corrupt")


def test_mismatched_vocabulary_is_refused(run_dir, capsys):
    state = torch.load(run_dir / "last.pt", weights_only=True)
    tokens = state["vocab"]
    tokens[5], tokens[6] = tokens[6], tokens[5]  # same words, other ids: every caption would be mis-encoded
    save_checkpoint(run_dir / "last.pt", state)
    line = _refused(capsys, ["train", "--resume", str(run_dir)], run_dir, "vocabulary", "first difference at id 5")
    assert "dataset or dataset.min_freq changed" in line


def test_mismatched_architecture_is_refused(run_dir, small_root, capsys):
    _refused(capsys, ["train", "--resume", str(run_dir), "--config", str(TINY),
                      *small_overrides(small_root, *QUICK, "model.decoder_dim=48")],
             run_dir, "does not match the config's architecture", "model.decoder_dim: 32 -> 48")


def test_an_architecture_override_at_resume_is_named_as_the_thing_to_drop(run_dir, capsys):
    line = _refused(capsys, ["train", "--resume", str(run_dir), "model.decoder_dim=48"],
                    run_dir, "model.decoder_dim: 32 -> 48", "KEY=VALUE overrides")
    assert "without --config" not in line  # there was no --config to leave out


def test_weights_only_checkpoint_cannot_be_resumed(run_dir, capsys):
    state = torch.load(run_dir / "last.pt", weights_only=True)
    save_checkpoint(run_dir / "last.pt", {k: state[k] for k in ("model", "config", "vocab")})
    _refused(capsys, ["train", "--resume", str(run_dir)], run_dir, "lacks the training state")


@pytest.mark.slow  # trains a second run (--overwrite)
def test_run_dir_holding_another_run(run_dir, small_root, capsys, tmp_path):
    line = _refused(capsys, ["train", "--config", str(TINY), "--run-dir", str(run_dir),
                             *small_overrides(small_root, *QUICK, "train.lr=0.001")],
                    run_dir, "already holds a different run", "train.lr: 0.002 -> 0.001", "--overwrite")
    assert "--resume" in line
    _refused(capsys, ["train", "--resume", str(tmp_path / "empty")], tmp_path / "empty", "no last.pt")
    _refused(capsys, ["train", "--resume", str(run_dir), "--overwrite"], run_dir, "contradict")
    # --overwrite starts over: the old run's files are replaced by the new run's
    assert cli(["-q", "train", "--config", str(TINY), "--run-dir", str(run_dir), "--device", "cpu", "--overwrite",
                *small_overrides(small_root, *QUICK, "train.lr=0.001")]) == 0
    assert torch.load(run_dir / "last.pt", weights_only=True)["config"]["train"]["lr"] == 0.001


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-0.1", "train.lr must be > 0, got -0.1"),
    ("decode.beam_size=0", "decode.beam_size' must be >= 1, got 0"),
    ("encoder.arch=resnet9", "unknown encoder.arch 'resnet9'"),
    ("encoder.layer=layer9", "layer 'layer9' not in resnet18"),
    ("encoder.finetune_from=layer9", "encoder.finetune_from: layer 'layer9' not in resnet18"),
    ("train.lr_schedule=linear", "train.lr_schedule must be one of: none, cosine, step, plateau"),
    ("train.select_metric=bleu5", "train.select_metric must be one of"),
    ("train.max_bad_steps=0", "train.max_bad_steps' must be >= 1"),
])
def test_bad_config_values(override, expected, small_root, tmp_path, capsys):
    folder = tmp_path / "never"
    _refused(capsys, ["train", "--config", str(TINY), "--run-dir", str(folder),
                      *small_overrides(small_root, override)], folder, expected)
    assert not folder.exists()


def test_a_failed_save_keeps_the_previous_checkpoint(run_dir, monkeypatch):
    import errno

    from captioner.engine.infer import checkpoint
    from captioner.errors import CaptionerError

    before = (run_dir / "last.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CaptionerError, match=r"cannot write checkpoint .*last.pt: .*No space left on device .*; "
                                             r"the previous last.pt is intact"):
        save_checkpoint(run_dir / "last.pt", {"model": {}})
    assert (run_dir / "last.pt").read_bytes() == before
    assert not list(run_dir.glob("*.tmp"))


def test_a_run_dir_without_a_checkpoint_is_started_over_whatever_its_config(tmp_path):
    # A run that stopped at its start (a tracker refused, a bad image folder) leaves config.yaml, vocab.json and
    # metrics.jsonl: a new command with other settings was told to `--resume`, which refused for lack of last.pt.
    from captioner.config import load_config, to_dict, to_yaml
    from captioner.engine.train.rundir import plan_run
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(TINY, ["train.log_to=[jsonl,mlflow]"])))
    (tmp_path / "vocab.json").write_text("[]")
    (tmp_path / "metrics.jsonl").write_text("")
    assert plan_run(tmp_path, to_dict(load_config(TINY)), resume=False, overwrite=False) == "new"
    (tmp_path / "last.pt").write_bytes(b"")  # a checkpoint to keep: refused as before
    with pytest.raises(Exception, match="already holds a different run"):
        plan_run(tmp_path, to_dict(load_config(TINY)), resume=False, overwrite=False)
