"""The CLI: one-line errors with exit code 2, and the train -> evaluate -> caption path."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from captioner.cli import main

from helpers import TINY


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_bad_layer_is_one_line(capsys, tmp_path):
    assert main(["train", "--config", str(TINY), "--run-dir", str(tmp_path), "encoder.layer=layer9"]) == 2
    line = _error_line(capsys)
    assert "layer 'layer9' not in resnet18" in line and "layer4" in line and "Traceback" not in line


@pytest.mark.parametrize("argv, expected", [
    (["caption", "--checkpoint", "m.pt"], "captioner caption: error: missing PATH ("),
    (["caption", "photo.jpg"], "captioner caption: error: missing --checkpoint ("),
    (["caption", "--beam", "x", "--checkpoint", "m.pt", "p.jpg"], "argument --beam: invalid int value: 'x'"),
    (["train", "--nope"], "captioner: error: unrecognized arguments: --nope ("),
])
def test_usage_errors_are_one_line_without_the_usage(capsys, argv, expected):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and expected in err[0], err
    assert "usage:" not in err[0] and "KEY=VALUE" not in err[0] and "--help" in err[0]


def test_bad_weights_and_config_are_one_line(capsys, tmp_path):
    assert main(["train", "--config", str(TINY), "--run-dir", str(tmp_path),
                 f"encoder.weights={tmp_path}/nope.pth"]) == 2
    assert "nope.pth not found" in _error_line(capsys)
    assert main(["train", "--config", str(TINY), "--run-dir", str(tmp_path), "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in _error_line(capsys)
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert "missing.yaml not found" in _error_line(capsys)
    assert not (tmp_path / "data").exists()  # nothing ran before the error


@pytest.mark.slow
def test_evaluate_and_caption_from_cli(trained, tmp_path, capsys):
    summary, cfg = trained
    assert main(["evaluate", "--checkpoint", summary["best_checkpoint"], "--beam", "1", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["decoding"] == "greedy" and metrics["beam_size"] == 1 and metrics["bleu4"] > 0.4  # it learned
    assert json.loads(Path(metrics["metrics_file"]).read_text())["bleu4"] == metrics["bleu4"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    from captioner.data.datasets import by_split, load_records
    import shutil
    for r in by_split(load_records(cfg.dataset), "test")[:5]:
        shutil.copy(r.path, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--checkpoint", summary["best_checkpoint"], str(folder), "--out", str(out),
                 "--workers", "0", "--device", "cpu"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 6
    assert sum("caption" in r for r in records) == 5
    assert [r["file"].endswith("broken.jpg") for r in records if "error" in r] == [True]


@pytest.mark.slow
def test_entry_point_and_script_help():
    # The entry point installed beside this interpreter (a venv's bin/ need not be on PATH: not activated).
    entry_point = Path(sysconfig.get_path("scripts")) / "captioner"
    for cmd in ([entry_point, "--help"], [sys.executable, "scripts/train.py", "--help"]):
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(TINY.parent.parent))
        assert done.returncode == 0 and "usage" in done.stdout


def test_evaluate_range_checks_and_checkpoint_overrides_are_one_line_errors(tiny_checkpoint, capsys):
    checkpoint = tiny_checkpoint  # refused before any decoding: an untrained model will do
    for args, words in ((["--beam", "0"], "--beam must be >= 1, got 0"),
                        (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
                        (["encoder.layer=layer3"], "encoder.layer=layer3: a trained checkpoint's encoder")):
        assert main(["evaluate", "--checkpoint", checkpoint, "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_plot_without_a_writable_home_gives_matplotlib_a_folder(monkeypatch, tmp_path):
    """A service account without a home: matplotlib would warn three lines while making a temporary folder."""
    from captioner.jobs import plot
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))
    plot._pyplot()
    folder = Path(os.environ["MPLCONFIGDIR"])
    assert folder.is_dir() and folder.name.startswith("captioner-matplotlib-")
    monkeypatch.setenv("HOME", str(tmp_path))  # a writable home: left to matplotlib
    monkeypatch.delenv("MPLCONFIGDIR")
    plot._pyplot()
    assert "MPLCONFIGDIR" not in os.environ


@pytest.mark.slow
def test_other_libraries_info_lines_stay_out_of_a_command(tmp_path, tiny_checkpoint):
    """A first `captioner plot` (an empty matplotlib cache, as a new user's) printed matplotlib's INFO line
    "generated new fontManager": the CLI showed every library's INFO. Ours still show (caption's compute line)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 1, "loss": 3.0 / s}) + "\n"
                                               for s in range(1, 6)))
    from PIL import Image
    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "photo.png")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "fresh-matplotlib-cache"), "OMP_NUM_THREADS": "1"}
    plotted = subprocess.run([sys.executable, "-m", "captioner", "plot", str(run)], env=env, capture_output=True,
                             text=True, timeout=120)
    assert plotted.returncode == 0 and (run / "curves.png").is_file()
    assert plotted.stderr == "", plotted.stderr
    captioned = subprocess.run([sys.executable, "-m", "captioner", "caption", "--checkpoint", str(tiny_checkpoint),
                                str(tmp_path / "photo.png"), "--out", str(tmp_path / "c.jsonl"), "--device", "cpu",
                                "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert captioned.returncode == 0, captioned.stderr
    assert "compute: " in captioned.stderr and "captioned 1 images" in captioned.stderr


@pytest.mark.slow  # starts a process
def test_other_libraries_info_lines_stay_out_of_a_commands_stderr():
    """The command configures logging for the process: its own info lines, and only warnings from the rest
    (a plot run with a fresh matplotlib folder logged "generated new fontManager")."""
    code = ("import logging, sys\n"
            "from captioner import cli\n"
            "def run(args):\n"
            "    logging.getLogger('matplotlib.font_manager').info('generated new fontManager')\n"
            "    logging.getLogger('matplotlib.font_manager').warning('a font is missing')\n"
            "    logging.getLogger('captioner').info('our progress')\n"
            "    return 0\n"
            "cli.run_command = run\n"
            "sys.exit(cli.main(['layers', 'resnet18']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["a font is missing", "our progress"]


def test_max_pixels_above_pillows_own_limit_is_honoured_by_the_command(tiny_checkpoint, tmp_path, monkeypatch):
    """Pillow refuses images above twice Image.MAX_IMAGE_PIXELS whatever --max-pixels says, and advises raising it
    in one's program: the command raises it instead (scaled down here: a 900-pixel image, Pillow's limit 800)."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    Image.new("RGB", (30, 30), (200, 10, 10)).save(tmp_path / "big.png")
    out = tmp_path / "c.jsonl"
    args = ["caption", "--checkpoint", tiny_checkpoint, str(tmp_path / "big.png"), "--out", str(out), "--device",
            "cpu", "--workers", "0"]
    assert main([*args, "--max-pixels", "2000"]) == 0
    record = json.loads(out.read_text())
    assert "caption" in record and "error" not in record, record
    assert Image.MAX_IMAGE_PIXELS == 2000
    assert main([*args, "--max-pixels", "800", "--out", str(tmp_path / "d.jsonl")]) == 0  # ours refuses first
    assert "above the limit of 800 pixels" in json.loads((tmp_path / "d.jsonl").read_text())["error"]
