"""One syntax on every command: KEY=VALUE config overrides anywhere after the command (--set KEY=VALUE the same),
-q and --device before or after it, and the shell completion script (cli/parser.py, cli/completion.py)."""
from __future__ import annotations

import json
import sys

import pytest

from captioner.cli import COMMANDS, build_job, build_parser, main
from captioner.cli.overrides import subcommands, takes_overrides
from helpers import ROOT, noise_pngs, read_records

# The fewest arguments each command parses with (nothing is read at parse level).
REQUIRED = {"caption": ["--checkpoint", "x.pt", "p.png"], "serve": ["--checkpoint", "x.pt"],
            "evaluate": ["--checkpoint", "x.pt"], "extract": ["--config", "c.yaml"], "prepare": ["--config", "c.yaml"],
            "train": ["--config", "c.yaml"], "layers": ["resnet18"], "plot": ["run"],  # parse level only
            "score": ["--results", "r.json", "--annotations", "a.json"],
            "export": ["--checkpoint", "x.pt", "--out", "m"]}
CONFIG_COMMANDS = {"demo", "train", "evaluate", "caption", "serve", "extract", "prepare"}


def _spellings(command: str) -> list[list[str]]:
    """The same two overrides spelled every way: after the options, before them, between, and through --set."""
    required = REQUIRED.get(command, [])
    a, b = "decode.max_len=5", "compute.bf16=false"
    return [[command, *required, a, b], [command, a, b, *required], [command, a, *required, b],
            [command, *required, "--set", a, f"--set={b}"], [command, "--set", a, *required, b]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reads_the_same_override_spelled_the_same_way(command, capsys):
    parser = build_parser()
    sub = subcommands(parser)[command]
    assert takes_overrides(sub) == (command in CONFIG_COMMANDS)
    for argv in _spellings(command):
        if command in CONFIG_COMMANDS:
            args = parser.parse_args(argv)
            assert args.overrides == ["decode.max_len=5", "compute.bf16=false"], argv
            assert getattr(args, "paths", ["p.png"]) == ["p.png"]  # never an image path
        else:  # no config to apply it to: one line naming the command and where overrides go
            with pytest.raises(SystemExit) as refused:
                parser.parse_args(argv)
            assert refused.value.code == 2
            err = capsys.readouterr().err
            if "--set" not in argv:
                assert f"{command} reads no config" in err and "train" in err, argv


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS - {"demo"}))
def test_an_unknown_key_is_refused_with_the_valid_ones_by_every_config_command(command, tmp_path):
    from captioner.config import Config, apply_overrides
    from captioner.errors import CaptionerError
    required = [str(ROOT / "configs" / "tiny.yaml") if a == "c.yaml" else a for a in REQUIRED[command]]
    if command == "train":
        required += ["--run-dir", str(tmp_path / "run")]
    args = build_parser().parse_args([command, *required, "decode.max_lenn=5"])
    assert args.overrides == ["decode.max_lenn=5"]
    with pytest.raises(CaptionerError) as refused:
        job = build_job(args)[1]  # train, extract and prepare load the config here; the others check the key
        apply_overrides(Config(), job.overrides)  # where the job reads the checkpoint later, the same check
    assert "decode.max_lenn" in str(refused.value) and "decode.max_len" in str(refused.value)


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"bench"}))
def test_quiet_and_device_before_or_after_the_command(command):
    parser = build_parser()
    sub = subcommands(parser)[command]
    has_device = any(a.dest == "device" for a in sub._actions)
    required = REQUIRED.get(command, [])
    for argv in (["-q", command, *required], [command, "-q", *required], [command, *required, "--quiet"]):
        assert parser.parse_args(argv).quiet is True
    assert parser.parse_args([command, *required]).quiet is False
    if has_device:
        assert parser.parse_args([command, *required]).device == "auto"
        assert parser.parse_args(["--device", "cpu", command, *required]).device == "cpu"
        assert parser.parse_args([command, *required, "--device", "cpu"]).device == "cpu"
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(["--device", "cpu", command, *required])


def test_option_values_and_existing_files_are_not_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shots.day=1").mkdir()  # a real folder whose name has the form of an override
    args = build_parser().parse_args(["caption", "--checkpoint", "x.pt", "shots.day=1", "--out", "a.b=c",
                                      "decode.max_len=5"])
    assert args.paths == ["shots.day=1"] and args.out == "a.b=c" and args.overrides == ["decode.max_len=5"]
    # the value of an abbreviated option (argparse accepts --check for --checkpoint) stays its value
    args = build_parser().parse_args(["caption", "--check", "a.b=c", "p.png", "decode.max_len=5"])
    assert args.checkpoint == "a.b=c" and args.overrides == ["decode.max_len=5"]
    args = build_parser().parse_args(["caption", "--checkpoint", "x.pt", "decode.max_len=5", "--", "decode.beam=2"])
    assert args.paths == ["decode.beam=2"] and args.overrides == ["decode.max_len=5"]  # after --: paths


def test_caption_with_an_override_after_the_paths_end_to_end(tiny_checkpoint, tmp_path, capsys):
    images = noise_pngs(tmp_path / "images", 2, 32)
    out = tmp_path / "c.jsonl"
    assert main(["caption", "--checkpoint", tiny_checkpoint, str(images), "decode.max_len=2", "--out", str(out),
                 "--workers", "0", "-q", "--device", "cpu", "compute.bf16=false"]) == 0
    records = read_records(out)
    assert len(records) == 2 and all(1 <= len(r["caption"].split()) <= 2 for r in records)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["captioned"] == 2
    assert main(["caption", "--checkpoint", tiny_checkpoint, str(images), "--out", str(out), "model.embed_dim=8"]) == 2
    assert "model.embed_dim" in capsys.readouterr().err


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_names_commands_options_and_config_keys(shell, capsys):
    pytest.importorskip("shtab")
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("caption", "evaluate", "--checkpoint", "--max-wait-ms", "decode.max_len=", "train.epochs="):
        assert word in script, word


def test_completion_without_shtab_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "shtab", None)  # import fails as when it is not installed
    assert main(["completion", "bash"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "captioner[completion]"' in err and len(err.splitlines()) == 1
