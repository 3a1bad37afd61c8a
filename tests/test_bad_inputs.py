"""Every command against a table of bad inputs, generated here: each gives a non-zero exit and one line (never a
traceback), and leaves every file that existed before exactly as it was."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import main
from captioner.engine.infer.checkpoint import save_checkpoint
from captioner.jobs.export import ExportJob, main as export
from captioner.progress import show_progress

from helpers import ROOT, SMALL_MODEL, TINY, small_overrides, untrained_state




@pytest.fixture(scope="module")
def world(tmp_path_factory, small_root):
    """A folder of inputs, good and bad, that the table refers to by name."""
    w = tmp_path_factory.mktemp("bad-inputs")
    (w / "afile").write_text("a plain file, in the way of a folder\n")
    (w / "adir").mkdir()
    (w / "latin1.yaml").write_bytes("train:\n  epochs: 1  # caf\u00e9\n".encode("latin-1"))
    (w / "utf16.yaml").write_text("train:\n  epochs: 1\n", encoding="utf-16")
    (w / "syntax.yaml").write_text("train: [epochs: 1\n")
    (w / "list.yaml").write_text("- train\n- epochs\n")
    (w / "unknown.yaml").write_text("train:\n  epoch: 1\n")
    (w / "wrongtype.yaml").write_text("train:\n  epochs: many\n")
    photos = w / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 20, 20), (20, 20, 200)]):
        Image.new("RGB", (24, 24), colour).save(photos / f"p{i}.png")
    state = untrained_state(*SMALL_MODEL, "decode.max_len=4")
    save_checkpoint(w / "ok.pt", state)

    def _state(**changes) -> dict:
        """The checkpoint's dict with some fields replaced (as a hand edit would)."""
        return {**state, **changes}

    bad = {
        "vocab_str.pt": _state(vocab="<pad> <start> <end> <unk> a red"),
        "vocab_nospecials.pt": _state(vocab=["a", "red", "square"]),
        "model_list.pt": _state(model=[1, 2, 3]),
        "model_shapes.pt": _state(model={k: v[..., :1] if v.dim() else v for k, v in state["model"].items()}),
        "config_str.pt": _state(config="encoder: resnet18"),
        "config_types.pt": _state(config={**state["config"], "encoder": {**state["config"]["encoder"],
                                                                         "image_size": "big"}}),
        "config_unknown.pt": _state(config={**state["config"], "extra": {"x": 1}}),
        "resume_types.pt": _state(optimizer="adam", schedule={}, scaler=None, progress={}, rng=[{}], metrics_offset=0),
        "resume_rng.pt": _state(optimizer={}, schedule={}, scaler=None, progress={}, rng="seed 0", metrics_offset=-1),
    }
    for name, content in bad.items():
        save_checkpoint(w / name, content)
    (w / "random.pt").write_bytes(os.urandom(2048))
    (w / "json.pt").write_text('{"model": {}}')
    (w / "truncated.pt").write_bytes((w / "ok.pt").read_bytes()[:4000])
    (w / "empty.pt").write_bytes(b"")
    for name in ("resume_types.pt", "resume_rng.pt"):  # run dirs whose last.pt is hand-edited
        (w / name.replace(".pt", "_run")).mkdir()
        (w / name.replace(".pt", "_run") / "last.pt").write_bytes((w / name).read_bytes())
    (w / "stranger.jsonl").write_text("my own notes, not caption records\n")
    coco = {"images": [{"id": 1, "file_name": "p0.png"}, {"id": 2, "file_name": "p1.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                            {"id": 2, "image_id": 2, "caption": "a blue square"}]}
    (w / "coco.json").write_text(json.dumps(coco))
    (w / "results.json").write_text(json.dumps([{"image_id": 1, "caption": "a red square"}]))
    (w / "results_bad.json").write_text('[{"image_id": 1, "caption": "a red')
    (w / "results_dict.json").write_text('{"a": 1}')
    (w / "results_unknown_id.json").write_text(json.dumps([{"image_id": 99, "caption": "a cat"}]))
    (w / "latin1.csv").write_bytes("image,caption\np0.png,un carr\u00e9 rouge\n".encode("latin-1"))
    (w / "utf16.csv").write_text("image,caption\np0.png,a dog\n", encoding="utf-16")
    (w / "empty.csv").write_text("")
    (w / "junk.bin").write_bytes(bytes(range(256)) * 4)
    (w / "run").mkdir()
    (w / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    _model_folders(w)
    return w


def _model_folders(w: Path) -> None:
    """w/model, exported from ok.pt, and hand-edited copies of it (the weights hard-linked, not copied)."""
    export(ExportJob(str(w / "ok.pt"), str(w / "model")))
    meta = json.loads((w / "model" / "config.json").read_text())
    edits = {"model_newer": {**meta, "format_version": 99}, "model_older": {**meta, "format_version": 0},
             "model_transformers": {"architectures": ["VisionEncoderDecoderModel"], "model_type": "vision-encoder"},
             "model_noweights": {**meta, "files": {**meta["files"], "weights": "gone.safetensors"}},
             "model_badjson": None}
    for name, content in edits.items():
        (w / name).mkdir()
        for f in ("model.safetensors", "vocab.json"):
            os.link(w / "model" / f, w / name / f)
        (w / name / "config.json").write_text(json.dumps(content) if content else '{"format": "captioner-model",')


def _table(w: Path, small_root: Path) -> dict[str, tuple[list[str], int]]:
    """{what: (argv, expected exit code)} for every bad input; w is the world fixture's folder."""
    tiny = str(TINY)
    train = ["train", "--config", tiny, "--run-dir", str(w / "newrun")]
    data = small_overrides(small_root, "train.epochs=1")
    caption = ["caption", "--device", "cpu", "--workers", "0"]
    ok = ["--checkpoint", str(w / "ok.pt"), str(w / "photos")]
    export_ok = ["export", "--checkpoint", str(w / "ok.pt")]
    score = ["score", "--no-meteor"]
    rows = [
        ("Latin-1 YAML config", ["train", "--config", str(w / "latin1.yaml"), "--run-dir", str(w / "r")], 2),
        ("UTF-16 YAML config", ["train", "--config", str(w / "utf16.yaml"), "--run-dir", str(w / "r")], 2),
        ("YAML syntax error", ["train", "--config", str(w / "syntax.yaml"), "--run-dir", str(w / "r")], 2),
        ("YAML list, not a mapping", ["train", "--config", str(w / "list.yaml"), "--run-dir", str(w / "r")], 2),
        ("unknown config key", ["train", "--config", str(w / "unknown.yaml"), "--run-dir", str(w / "r")], 2),
        ("config value of the wrong type", ["train", "--config", str(w / "wrongtype.yaml"), "--run-dir", str(w / "r")], 2),
        ("config file missing", ["train", "--config", str(w / "nope.yaml"), "--run-dir", str(w / "r")], 2),
        ("config is a folder", ["train", "--config", str(w / "adir"), "--run-dir", str(w / "r")], 2),
        ("override without =", [*train, "train.epochs"], 2),
        ("override of a bad value", [*train, "train.epochs=0"], 2),
        ("override given twice", [*train, "train.epochs=3", "train.epochs=4"], 2),
        ("bench override given twice", ["bench", "--smoke", "image_size=64", "image_size=32"], 2),
        ("bench image_size=0", ["bench", "--smoke", "image_size=0"], 2),
        ("unknown dataset.encoding", [*train, "dataset.encoding=klingon"], 2),
        ("run dir is a file", ["train", "--config", tiny, "--run-dir", str(w / "afile"), *data], 2),
        ("run dir under a file", ["train", "--config", tiny, "--run-dir", str(w / "afile" / "run"), *data], 2),
        ("encoder.layer=fc", [*train, *data, "encoder.layer=fc"], 2),
        ("non-CNN arch, default layer", [*train, *data, "encoder.arch=vit_b_16"], 2),
        ("a ViT's pooled head, not a grid", [*train, *data, "encoder.arch=vit_b_16", "encoder.layer=heads",
                                             "encoder.image_size=224"], 2),
        ("unknown arch", [*train, *data, "encoder.arch=resnet9000"], 2),
        ("resume a folder without last.pt", ["train", "--resume", str(w / "adir")], 2),
        ("resume, optimizer edited to a string", ["train", "--resume", str(w / "resume_types_run")], 2),
        ("resume, rng edited to a string", ["train", "--resume", str(w / "resume_rng_run")], 2),
        ("train without config", ["train", "--run-dir", str(w / "r")], 2),
        ("checkpoint missing", [*caption, "--checkpoint", str(w / "nope.pt"), str(w / "photos")], 2),
        ("checkpoint random bytes", [*caption, "--checkpoint", str(w / "random.pt"), str(w / "photos")], 2),
        ("checkpoint is JSON", [*caption, "--checkpoint", str(w / "json.pt"), str(w / "photos")], 2),
        ("checkpoint truncated", [*caption, "--checkpoint", str(w / "truncated.pt"), str(w / "photos")], 2),
        ("checkpoint empty", [*caption, "--checkpoint", str(w / "empty.pt"), str(w / "photos")], 2),
        ("checkpoint is a folder", [*caption, "--checkpoint", str(w / "adir"), str(w / "photos")], 2),
        *[(f"hand-edited checkpoint: {name}", [*caption, "--checkpoint", str(w / name), str(w / "photos"),
                                               "--out", str(w / "adir" / f"{name}.jsonl")], 2)
          for name in ("vocab_str.pt", "vocab_nospecials.pt", "model_list.pt", "model_shapes.pt", "config_str.pt",
                       "config_types.pt", "config_unknown.pt")],
        *[(f"model folder: {name}", [*caption, "--checkpoint", str(w / name), str(w / "photos"),
                                     "--out", str(w / "adir" / f"{name}.jsonl")], 2)
          for name in ("model_newer", "model_older", "model_transformers", "model_noweights", "model_badjson")],
        ("evaluate a model folder of a newer format", ["evaluate", "--checkpoint", str(w / "model_newer"),
                                                       "--device", "cpu", "--out", str(w / "e")], 2),
        ("export --out a file", [*export_ok, "--out", str(w / "afile")], 2),
        ("export --out under a file", [*export_ok, "--out", str(w / "afile" / "m")], 2),
        ("export --out a folder of photos", [*export_ok, "--out", str(w / "photos")], 2),
        ("export --overwrite a folder of photos", [*export_ok, "--out", str(w / "photos"), "--overwrite"], 2),
        ("export --out an existing model folder", [*export_ok, "--out", str(w / "model")], 2),
        ("export onto its own model folder", ["export", "--checkpoint", str(w / "model"), "--out", str(w / "model"),
                                              "--overwrite"], 2),
        ("export --dtype fp16", [*export_ok, "--out", str(w / "m"), "--dtype", "fp16"], 2),
        ("export --format pickle", [*export_ok, "--out", str(w / "m"), "--format", "pickle"], 2),
        ("export --metrics not JSON", [*export_ok, "--out", str(w / "m"), "--metrics", str(w / "results_bad.json")], 2),
        ("export --metrics without scores", [*export_ok, "--out", str(w / "m"), "--metrics",
                                             str(w / "results_dict.json")], 2),
        ("export --push not a repo id", [*export_ok, "--out", str(w / "m"), "--push", "not a repo"], 2),
        ("export --private without --push", [*export_ok, "--out", str(w / "m"), "--private"], 2),
        ("export a truncated checkpoint", ["export", "--checkpoint", str(w / "truncated.pt"), "--out", str(w / "m")],
         2),
        ("export a missing checkpoint", ["export", "--checkpoint", str(w / "nope.pt"), "--out", str(w / "m")], 2),
        ("export a model folder of a newer format", ["export", "--checkpoint", str(w / "model_newer"), "--out",
                                                     str(w / "m")], 2),
        ("caption --out under a file", [*caption, *ok, "--out", str(w / "afile" / "c.jsonl")], 2),
        ("caption --out a folder", [*caption, *ok, "--out", str(w / "adir")], 2),
        ("caption --out a device", [*caption, *ok, "--out", "/dev/zero"], 2),
        ("caption --out - (standard output)", [*caption, *ok, "--out", "-"], 2),
        ("score --out - (standard output)", [*score, "--results", str(w / "results.json"), "--annotations",
                                             str(w / "coco.json"), "--out", "-"], 2),
        ("caption --html under a file", [*caption, *ok, "--out", str(w / "c1.jsonl"), "--html",
                                         str(w / "afile" / "g.html")], 2),
        ("caption --html a folder", [*caption, *ok, "--out", str(w / "c2.jsonl"), "--html", str(w / "adir")], 2),
        ("caption into a stranger's file", [*caption, *ok, "--out", str(w / "stranger.jsonl")], 2),
        ("caption --beam 0", [*caption, *ok, "--beam", "0"], 2),
        ("caption --workers -1", [*caption, *ok, "--workers", "-1"], 2),
        ("caption a path that does not exist", [*caption, "--checkpoint", str(w / "ok.pt"), str(w / "nothing")], 2),
        ("caption a folder without images", [*caption, "--checkpoint", str(w / "ok.pt"), str(w / "adir")], 2),
        ("evaluate a random file", ["evaluate", "--checkpoint", str(w / "random.pt"), "--device", "cpu"], 2),
        ("evaluate --split nonsense", ["evaluate", "--checkpoint", str(w / "ok.pt"), "--split", "nonsense",
                                       "--device", "cpu", f"dataset.root={small_root}"], 2),
        ("evaluate --out a file name", ["evaluate", "--checkpoint", str(w / "ok.pt"), "--out", str(w / "ev.json"),
                                        "--device", "cpu"], 2),
        ("evaluate --out under a file", ["evaluate", "--checkpoint", str(w / "ok.pt"), "--out", str(w / "afile" / "e"),
                                         "--device", "cpu", *small_overrides(small_root)], 2),
        ("score: results not JSON", [*score, "--results", str(w / "results_bad.json"), "--annotations",
                                     str(w / "coco.json")], 2),
        ("score: results a mapping", [*score, "--results", str(w / "results_dict.json"), "--annotations",
                                      str(w / "coco.json")], 2),
        ("score: unknown image ids", [*score, "--results", str(w / "results_unknown_id.json"), "--annotations",
                                      str(w / "coco.json")], 2),
        ("score: Latin-1 annotations", [*score, "--results", str(w / "results.json"), "--annotations",
                                        str(w / "latin1.csv")], 2),
        ("score: UTF-16 annotations", [*score, "--results", str(w / "results.json"), "--annotations",
                                       str(w / "utf16.csv")], 2),
        ("score: empty annotations", [*score, "--results", str(w / "results.json"), "--annotations",
                                      str(w / "empty.csv")], 2),
        ("score: binary annotations", [*score, "--results", str(w / "results.json"), "--annotations",
                                       str(w / "junk.bin")], 2),
        ("score --out a folder", [*score, "--results", str(w / "results.json"), "--annotations", str(w / "coco.json"),
                                  "--out", str(w / "adir")], 2),
        ("score --out under a file", [*score, "--results", str(w / "results.json"), "--annotations",
                                      str(w / "coco.json"), "--out", str(w / "afile" / "m.json")], 2),
        ("extract cache.dir under a file", ["extract", "--config", tiny, "--device", "cpu", *data,
                                            f"cache.dir={w / 'afile' / 'cache'}"], 2),
        ("extract --split nonsense", ["extract", "--config", tiny, "--split", "nonsense", *data], 2),
        ("extract Latin-1 config", ["extract", "--config", str(w / "latin1.yaml")], 2),
        ("prepare --out under a file", ["prepare", "--config", tiny, "--out", str(w / "afile" / "p"), *data], 2),
        ("prepare Latin-1 captions", ["prepare", "--config", tiny, "--out", str(w / "prep"), "dataset.format=auto",
                                      f"dataset.annotations={w / 'latin1.csv'}"], 2),
        ("layers --image-size 0", ["layers", "resnet18", "--image-size", "0"], 2),
        ("layers --image-size -3", ["layers", "resnet18", "--image-size", "-3"], 2),
        ("layers --in-channels 0", ["layers", "resnet18", "--in-channels", "0"], 2),
        ("layers: ViT at a size it cannot take", ["layers", "vit_b_16", "--image-size", "64"], 2),
        ("layers: unknown arch", ["layers", "resnet9000"], 2),
        ("plot a folder without metrics", ["plot", str(w / "adir")], 2),
        ("plot --out under a file", ["plot", str(w / "run"), "--out", str(w / "afile" / "c.png")], 2),
        ("plot --out a folder", ["plot", str(w / "run"), "--out", str(w / "adir")], 2),
        ("demo --out under a file", ["demo", "--out", str(w / "afile" / "demo")], 2),
        ("no command", [], 2),
        ("unknown command", ["frobnicate"], 2),
    ]
    table = {what: (argv, code) for what, argv, code in rows}
    assert len(table) == len(rows), "two rows with one name"
    return table


# Rows that build ViT-B/16 (86M parameters): a second or two of CPU each.
SLOW_ROWS = {"non-CNN arch, default layer", "a ViT's pooled head, not a grid", "layers: ViT at a size it cannot take"}
# The rows' names, which are the tests' ids; the paths in them are filled in per test from the fixtures.
NAMES = list(_table(Path("world"), Path("small-root")))
assert SLOW_ROWS <= set(NAMES), "a row in SLOW_ROWS was renamed"
ROWS = [pytest.param(what, marks=pytest.mark.slow) if what in SLOW_ROWS else what for what in NAMES]


def _files(folder: Path) -> dict:
    """Every file's size, modification time and inode, and the bytes of the small ones (checkpoints are 45 MB)."""
    def state(p: Path):
        stat = p.stat()
        return stat.st_size, stat.st_mtime_ns, stat.st_ino, p.read_bytes() if stat.st_size < 1 << 20 else None
    return {p: state(p) for p in folder.rglob("*") if p.is_file()}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_the_table_has_enough_rows(world, small_root):
    assert len(_table(world, small_root)) == len(NAMES) >= 40


@pytest.mark.parametrize("what", ROWS)
def test_bad_input(world, small_root, what):
    argv, expected = _table(world, small_root)[what]
    before = _files(world)
    code, out, err = _run(argv)
    assert code == expected, f"{what}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in out + err, f"{what}:\n{err}"
    lines = [line for line in err.strip().splitlines() if line.startswith("captioner")]
    assert lines and len(lines[-1]) > len("captioner x: error: ") + 10, f"{what}: no error line in\n{err}"
    after = _files(world)
    changed = [str(p.relative_to(world)) for p in before if after.get(p) != before[p]]
    assert not changed, f"{what}: modified {changed}"
    stray = [str(p.relative_to(world)) for p in after if p.name.endswith(".tmp")]
    assert not stray, f"{what}: left {stray}"


# ---------------------------------------------------------------- through a real process: pipes, redirected logs


def _captioner(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *args], cwd=ROOT, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


@pytest.mark.slow
def test_layers_into_a_pipe_closed_early_is_quiet():
    # `captioner layers resnet152 | head -1`: the reader leaves after one line.
    process = subprocess.Popen([sys.executable, "-m", "captioner", "layers", "resnet152"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    first = process.stdout.readline()
    process.stdout.close()  # as head does
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    process.stderr.close()
    assert first.split() == [b"module", b"type", b"output", b"grid", b"(encoder.layer", b"gives)"]
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.slow
def test_quiet_and_redirected_logs_have_no_progress_bars(world, tmp_path, capsys, caplog):
    # stderr is a file here, not a terminal: no bars, no carriage returns, even without -q.
    args = ["caption", "--checkpoint", str(world / "ok.pt"), str(world / "photos"), "--device", "cpu",
            "--workers", "0"]
    loud = _captioner(*args, "--out", str(tmp_path / "a.jsonl"))
    assert loud.returncode == 0 and b"\r" not in loud.stderr and b"captioned 2 images" in loud.stderr
    # -q: warnings and errors only, so nothing at all for a run without problems.
    caplog.clear()
    level = logging.getLogger("captioner").level
    try:
        assert main(["-q", *args, "--out", str(tmp_path / "b.jsonl")]) == 0
        assert capsys.readouterr().err == "" and not [r for r in caplog.records if r.levelno < logging.WARNING]
        assert not show_progress()
    finally:
        logging.getLogger("captioner").setLevel(level)
