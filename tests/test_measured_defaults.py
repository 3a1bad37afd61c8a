"""The measured-best defaults (docs/quality.md, k-fold table) apply to new runs only; old checkpoints and runs
continuing them keep the settings they were trained with; --print-config shows the resolved config."""
from __future__ import annotations

import pytest
import yaml

from captioner.cli import main
from captioner.config import (DEFAULTS_BEFORE_MEASURED, Config, from_saved_dict, load_config, to_dict)
from captioner.engine.infer.checkpoint import save_checkpoint
from captioner.engine.infer.model_folder import load_model_source
from captioner.engine.train.rundir import write_run_files
from captioner.jobs.train import TrainJob
from captioner.text import Vocabulary
from helpers import SHAPE_CAPTIONS, TINY, untrained_state

MEASURED = {"train.label_smoothing": 0.1, "decode.suppress_unk": True}
OLD = {"train.label_smoothing": 0.0, "decode.suppress_unk": False, "train.val_beam_size": 1}


def _values(cfg: Config, keys) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in keys}


def _old_style(config: dict) -> dict:
    """config as an older captioner saved it: without the keys whose defaults were measured since."""
    return {section: {k: v for k, v in values.items() if k not in DEFAULTS_BEFORE_MEASURED.get(section, {})}
            for section, values in config.items()}


def test_a_new_config_gets_the_measured_defaults_and_validates_on_the_decoding_beam():
    cfg = load_config(TINY)
    assert _values(cfg, MEASURED) == MEASURED
    assert cfg.train.val_beam_size == cfg.decode.beam_size == 3
    assert load_config(TINY, ["decode.beam_size=5"]).train.val_beam_size == 5  # resolved after the overrides
    assert load_config(None).train.val_beam_size == Config().decode.beam_size


def test_a_command_line_override_wins_over_every_measured_default():
    cfg = load_config(TINY, ["train.label_smoothing=0", "decode.suppress_unk=false", "train.val_beam_size=1",
                             "decode.beam_size=5"])
    assert _values(cfg, OLD) == OLD


def test_an_old_saved_config_without_the_keys_keeps_the_old_defaults():
    saved = _old_style(to_dict(load_config(TINY)))
    assert "label_smoothing" not in saved["train"] and "suppress_unk" not in saved["decode"]
    assert _values(from_saved_dict(saved), OLD) == OLD
    kept = to_dict(load_config(TINY, ["train.label_smoothing=0.2"]))  # a saved config's own values stay
    assert from_saved_dict(kept).train.label_smoothing == 0.2
    assert from_saved_dict({**kept, "train": {**kept["train"], "val_beam_size": 0}}).train.val_beam_size == 3


def test_an_old_checkpoint_decodes_as_it_was_saved(tmp_path):
    state = untrained_state("decode.max_len=4")
    save_checkpoint(tmp_path / "old.pt", {**state, "config": _old_style(state["config"])})
    save_checkpoint(tmp_path / "new.pt", state)
    assert load_model_source(tmp_path / "old.pt")[2].decode.suppress_unk is False
    assert load_model_source(tmp_path / "new.pt")[2].decode.suppress_unk is True


def test_a_new_run_records_the_measured_defaults_in_its_config_yaml(tmp_path):
    job = TrainJob(config=str(TINY), run_dir=str(tmp_path / "run"), overrides=["decode.beam_size=2"])
    write_run_files(tmp_path / "run", job.cfg, Vocabulary.build(SHAPE_CAPTIONS), clear=False)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (written["train"]["label_smoothing"], written["decode"]["suppress_unk"]) == (0.1, True)
    assert written["train"]["val_beam_size"] == 2  # resolved: the number validation used


def test_init_from_an_old_checkpoint_keeps_its_settings_unless_stated(tmp_path):
    state = untrained_state()
    save_checkpoint(tmp_path / "old.pt", {**state, "config": _old_style(state["config"])})
    save_checkpoint(tmp_path / "new.pt", state)
    old = TrainJob(config=str(TINY), run_dir=str(tmp_path / "a"), init_from=str(tmp_path / "old.pt"))
    assert _values(old.cfg, OLD) == OLD
    stated = TrainJob(config=str(TINY), run_dir=str(tmp_path / "b"), init_from=str(tmp_path / "old.pt"),
                      overrides=["train.label_smoothing=0.2", "decode.suppress_unk=true"])
    assert (stated.cfg.train.label_smoothing, stated.cfg.decode.suppress_unk) == (0.2, True)
    new = TrainJob(config=str(TINY), run_dir=str(tmp_path / "c"), init_from=str(tmp_path / "new.pt"))
    assert _values(new.cfg, MEASURED) == MEASURED and new.cfg.train.val_beam_size == 3


def test_resuming_an_old_run_keeps_its_settings_with_or_without_its_config_file(tmp_path):
    state = untrained_state()
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "last.pt", {**state, "config": _old_style(state["config"])})
    for config in (None, str(TINY)):
        job = TrainJob(config=config, run_dir=str(tmp_path / "run"), resume=True, print_config=True)
        assert _values(job.cfg, OLD) == OLD


@pytest.mark.parametrize("command", [["train", "--run-dir", "runs/x"], ["train"], ["extract"]])
def test_print_config_prints_the_resolved_config_and_touches_nothing(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*command, "--config", str(TINY), "train.epochs=3", "--print-config", "decode.beam_size=4"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(TINY, ["train.epochs=3", "decode.beam_size=4"]))
    assert (printed["train"]["epochs"], printed["train"]["val_beam_size"]) == (3, 4)
    assert printed["train"]["label_smoothing"] == 0.1 and printed["decode"]["suppress_unk"] is True
    assert list(tmp_path.iterdir()) == []  # no run dir, no data, no cache


def test_print_config_of_evaluate_and_caption_is_the_checkpoints_as_they_decode(tmp_path, monkeypatch, capsys):
    state = untrained_state("decode.max_len=4")
    save_checkpoint(tmp_path / "old.pt", {**state, "config": _old_style(state["config"])})
    save_checkpoint(tmp_path / "new.pt", state)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "old.pt"), "--print-config", "--beam", "5",
                 "--max-len", "9", "decode.block_ngram=2"]) == 0
    decode = yaml.safe_load(capsys.readouterr().out)["decode"]
    assert (decode["beam_size"], decode["max_len"], decode["block_ngram"], decode["suppress_unk"]) == (5, 9, 2, False)
    assert main(["caption", "--checkpoint", str(tmp_path / "new.pt"), "photo.jpg", "--print-config", "--sample",
                 "--temperature", "0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["decode"]["sample"], printed["decode"]["temperature"], printed["decode"]["suppress_unk"]) == (
        True, 0.5, True)
    assert printed["model"] == state["config"]["model"] and printed["compute"] == to_dict(Config())["compute"]
    assert list((tmp_path / "work").iterdir()) == []  # no results, metrics or captions files
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--print-config"]) == 2
    assert "--print-config reads a local checkpoint" in capsys.readouterr().err


def test_print_config_of_serve_is_the_checkpoints_with_its_overrides_and_starts_nothing(tmp_path, monkeypatch,
                                                                                          capsys):
    from captioner.jobs import serve
    monkeypatch.setattr(serve, "main", lambda job: pytest.fail("serve --print-config started the server"))
    state = untrained_state("decode.max_len=4", "decode.groups=2", "decode.beam_size=4")
    save_checkpoint(tmp_path / "new.pt", state)
    save_checkpoint(tmp_path / "old.pt", {**state, "config": _old_style(state["config"])})
    assert main(["serve", "--checkpoint", str(tmp_path / "new.pt"), "--print-config", "--beam", "5",
                 "decode.block_ngram=2", "compute.bf16=false"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    decode = printed["decode"]
    # a beam its groups do not divide searches without groups, as the server decodes
    assert (decode["beam_size"], decode["groups"], decode["max_len"], decode["block_ngram"]) == (5, 1, 4, 2)
    assert printed["compute"] == {**to_dict(Config())["compute"], "bf16": "false"}
    assert printed["model"] == state["config"]["model"]
    assert main(["serve", "--checkpoint", str(tmp_path / "old.pt"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"]["suppress_unk"] is False  # what it was trained with
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--print-config"]) == 2
    assert "--print-config reads a local checkpoint" in capsys.readouterr().err


def test_print_config_of_demo_is_its_training_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from captioner.jobs import demo
    monkeypatch.setattr(demo, "main", lambda job: pytest.fail("demo --print-config ran the demo"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "d", "--print-config", "train.lr=0.002"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    root = str(tmp_path.resolve() / "d" / "data")
    assert printed == to_dict(load_config(TINY, [f"dataset.root={root}", "train.epochs=15", "train.lr=0.002"]))
    assert printed == to_dict(demo.demo_config(demo.DemoJob(out="d", overrides=["train.lr=0.002"])))
    assert list(tmp_path.iterdir()) == []  # no data, no run


def test_print_config_is_in_the_help(capsys):
    for command in ("train", "extract", "evaluate", "caption", "serve", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--print-config" in capsys.readouterr().out
