"""Inputs are sacred: no command writes an output that is, contains or lies inside one of its inputs (through
symbolic and hard links), --overwrite included. Each is refused before any work with one line naming both paths,
and the input is left byte for byte. A replaced folder is swapped in only once complete; a symlinked output
folder is written through."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.files import atomic_folder
from captioner.io_paths import refuse_overlap

from helpers import SMALL_MODEL, TINY, untrained_checkpoint

SMALL = [*SMALL_MODEL, "decode.max_len=4", "dataset.synthetic_images=12"]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """A workspace: a checkpoint, a model folder M holding a checkpoint and metrics, images and a list, results
    and references, a run with metrics.jsonl, a prepared folder and a CSV dataset."""
    w = tmp_path_factory.mktemp("sacred")
    untrained_checkpoint(w / "ok.pt", *SMALL, f"dataset.root={w / 'data'}")
    model = w / "M"
    model.mkdir()
    (model / "best.pt").write_bytes((w / "ok.pt").read_bytes())
    (model / "config.json").write_text("{}")  # what --overwrite takes for a model folder
    (model / "metrics_test.json").write_text(json.dumps({"bleu4": 0.1}))
    (w / "link-to-M-best.pt").symlink_to(model / "best.pt")
    from PIL import Image
    (w / "photos").mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(w / "photos" / "a.png")
    (w / "list.txt").write_text(str(w / "photos" / "a.png") + "\n")
    (w / "results.json").write_text(json.dumps([{"image_id": 1, "caption": "a red square"}]))
    (w / "refs.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                             "annotations": [{"image_id": 1, "caption": "a red square"}]}))
    (w / "run").mkdir()
    (w / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    os.link(w / "run" / "metrics.jsonl", w / "hardlink.png")
    (w / "prepared").mkdir()
    (w / "prepared" / "splits.json").write_text(json.dumps({"train": [1], "val": [], "test": []}))
    (w / "csv").mkdir()
    (w / "csv" / "captions.csv").write_text("image,caption\na.png,a red square\n")
    (w / "evalout").mkdir()
    (w / "evalout" / "results_test.json").write_text('{"image": "a.png", "caption": "a red square"}\n')
    (w / "weights").mkdir()
    (w / "weights" / "encoder.pth").write_bytes(b"weights")
    (w / "initrun").mkdir()
    (w / "initrun" / "best.pt").write_bytes((w / "ok.pt").read_bytes())
    return w


def CSV(w: Path) -> list[str]:  # noqa: N802 - reads as the constant it stands for
    """A CSV dataset: captions in w/csv/captions.csv, images in w/photos."""
    return ["dataset.format=csv", f"dataset.annotations={w / 'csv' / 'captions.csv'}", f"dataset.images={w / 'photos'}"]

# what -> (argv, the step that must not start, the input that must stay as it was, the input named)
ROWS = {
    "export --out contains its --checkpoint (--overwrite)": (
        lambda w: ["export", "--checkpoint", str(w / "M" / "best.pt"), "--out", str(w / "M"), "--overwrite"],
        "captioner.jobs.export._load", "M/best.pt", "M/best.pt"),
    "export --out contains its --metrics (--overwrite)": (
        lambda w: ["export", "--checkpoint", str(w / "ok.pt"), "--metrics", str(w / "M" / "metrics_test.json"),
                   "--out", str(w / "M"), "--overwrite"], "captioner.jobs.export._load", "M/metrics_test.json",
        "M/metrics_test.json"),
    "export --out contains a checkpoint given by a symbolic link": (
        lambda w: ["export", "--checkpoint", str(w / "link-to-M-best.pt"), "--out", str(w / "M"), "--overwrite"],
        "captioner.jobs.export._load", "M/best.pt", "link-to-M-best.pt"),
    "plot --out is the run's metrics.jsonl": (
        lambda w: ["plot", str(w / "run"), "--out", str(w / "run" / "metrics.jsonl")],
        "captioner.jobs.plot._curves", "run/metrics.jsonl", "run/metrics.jsonl"),
    "plot --out is a hard link to metrics.jsonl": (
        lambda w: ["plot", str(w / "run"), "--out", str(w / "hardlink.png")],
        "captioner.jobs.plot._curves", "run/metrics.jsonl", "run/metrics.jsonl"),
    "score --out is --results": (
        lambda w: ["score", "--no-meteor", "--results", str(w / "results.json"), "--annotations",
                   str(w / "refs.json"), "--out", str(w / "results.json")],
        "captioner.jobs.score.read_results", "results.json", "results.json"),
    "score --out is --annotations": (
        lambda w: ["score", "--no-meteor", "--results", str(w / "results.json"), "--annotations",
                   str(w / "refs.json"), "--out", str(w / "refs.json")],
        "captioner.jobs.score.read_results", "refs.json", "refs.json"),
    "caption --out is an input image": (
        lambda w: ["caption", "--checkpoint", str(w / "ok.pt"), str(w / "photos"), "--out",
                   str(w / "photos" / "a.png"), "--device", "cpu", "--workers", "0", "--format", "jsonl"],
        "captioner.jobs.caption.load_for_job", "photos/a.png", "photos/a.png"),
    "caption --out is the list of images": (
        lambda w: ["caption", "--checkpoint", str(w / "ok.pt"), str(w / "list.txt"), "--out",
                   str(w / "list.txt"), "--device", "cpu", "--workers", "0", "--format", "jsonl"],
        "captioner.jobs.caption.load_for_job", "list.txt", "list.txt"),
    "caption --html is the checkpoint": (
        lambda w: ["caption", "--checkpoint", str(w / "ok.pt"), str(w / "photos"), "--out",
                   str(w / "captions.jsonl"), "--html", str(w / "ok.pt"), "--device", "cpu", "--workers", "0"],
        "captioner.jobs.caption.load_for_job", "ok.pt", "ok.pt"),
    "evaluate --out inside the model folder": (
        lambda w: ["evaluate", "--checkpoint", str(w / "M"), "--out", str(w / "M"), "--device", "cpu"],
        "captioner.jobs.evaluate.load_for_job", "M/best.pt", "M"),
    "evaluate results file is the dataset's annotations": (
        lambda w: ["evaluate", "--checkpoint", str(w / "ok.pt"), "--out", str(w / "evalout"), "--split", "test",
                   "--device", "cpu", f"dataset.annotations={w / 'evalout' / 'results_test.json'}",
                   "dataset.format=jsonl"],
        "captioner.jobs.evaluate.load_records", "evalout/results_test.json", "evalout/results_test.json"),
    "train --run-dir contains the dataset": (
        lambda w: ["train", "--config", str(TINY), "--run-dir", str(w), "--device", "cpu", *CSV(w), *SMALL],
        "captioner.jobs.train._train", "csv/captions.csv", "csv/captions.csv"),
    "train --run-dir holds --init-from (--overwrite)": (
        lambda w: ["train", "--config", str(TINY), "--run-dir", str(w / "initrun"), "--overwrite", "--init-from",
                   str(w / "initrun" / "best.pt"), "--device", "cpu", *CSV(w), *SMALL],
        "captioner.jobs.train._train", "initrun/best.pt", "initrun/best.pt"),
    "train --run-dir is the image folder": (
        lambda w: ["train", "--config", str(TINY), "--run-dir", str(w / "photos"), "--device", "cpu", *CSV(w),
                   *SMALL], "captioner.jobs.train._train", "photos/a.png", "photos"),
    "extract cache.dir is the image folder": (
        lambda w: ["extract", "--config", str(TINY), "--device", "cpu", *CSV(w), *SMALL,
                   f"cache.dir={w / 'photos'}"], "captioner.jobs.extract.build_encoder", "photos/a.png", "photos"),
    "extract cache.dir contains the captions file": (
        lambda w: ["extract", "--config", str(TINY), "--device", "cpu", *CSV(w), *SMALL, f"cache.dir={w / 'csv'}"],
        "captioner.jobs.extract.build_encoder", "csv/captions.csv", "csv/captions.csv"),
    "extract cache.dir contains encoder.weights": (
        lambda w: ["extract", "--config", str(TINY), "--device", "cpu", *CSV(w), *SMALL,
                   f"encoder.weights={w / 'weights' / 'encoder.pth'}", f"cache.dir={w / 'weights'}"],
        "captioner.jobs.extract.build_encoder", "weights/encoder.pth", "weights/encoder.pth"),
    "prepare --out rewrites dataset.splits": (
        lambda w: ["prepare", "--config", str(TINY), "--out", str(w / "prepared"), *CSV(w), *SMALL,
                   f"dataset.splits={w / 'prepared' / 'splits.json'}"],
        "captioner.jobs.prepare.read_dataset", "prepared/splits.json", "prepared/splits.json"),
    "demo trains over its dataset.root": (
        lambda w: ["demo", "--out", str(w / "demo"), "--device", "cpu", f"dataset.root={w / 'demo' / 'run'}"],
        "captioner.jobs.train._train", "demo/run/captions.json", "demo/run"),
}

# Commands that read nothing the user names, or write nothing: no row can make them destroy an input.
NO_INPUTS = {"bench", "serve", "layers"}


def test_the_table_covers_every_command_that_writes():
    from captioner.cli import COMMANDS
    assert {what.split()[0] for what in ROWS} == set(COMMANDS) - NO_INPUTS


def _snapshot(path: Path):
    return sorted((str(p), p.read_bytes()) for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.read_bytes()


@pytest.mark.parametrize("row", ROWS)
def test_an_output_never_replaces_an_input(row, w, monkeypatch):
    argv, work, kept, named = ROWS[row]
    if row.startswith("demo"):  # a synthetic set from an earlier demo, under the run dir the demo trains in
        (w / "demo" / "run").mkdir(parents=True, exist_ok=True)
        (w / "demo" / "run" / "captions.json").write_text("{}")
    before = _snapshot(w / kept)

    def started(*args, **kwargs):
        raise AssertionError(f"{row}: the work started before the output was checked against the inputs")
    monkeypatch.setattr(work, started)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv(w))
    err = err.getvalue()
    assert code == 2, f"{row}: exit {code}\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("captioner ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(w / named) in lines[0] and "input" in lines[0], lines[0]
    assert _snapshot(w / kept) == before


def test_refuse_overlap_relations(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"w")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"a")
    (tmp_path / "linked").symlink_to(tmp_path / "model")
    inputs, folders = {"--checkpoint": tmp_path / "model"}, {"folder": [tmp_path / "photos"]}
    for out, relation in ((tmp_path / "model", "is the same file as"), (tmp_path, "contains"),
                          (tmp_path / "model" / "sub" / "x.json", "lies inside"),
                          (tmp_path / "linked" / "x.json", "lies inside"), (tmp_path / "linked", "is the same"),
                          (tmp_path / "photos", "is the same|contains"),
                          (tmp_path / "photos" / "a.jpg", "is the same")):
        with pytest.raises(CaptionerError, match=relation):
            refuse_overlap({"--out": out}, {**inputs, "image": [tmp_path / "photos" / "a.jpg"]}, folders)
    refuse_overlap({"--out": tmp_path / "photos" / "captions.jsonl"}, inputs, folders)  # beside the images: fine
    refuse_overlap({"--out": tmp_path / "elsewhere" / "m"}, inputs, folders)
    refuse_overlap({"--out": tmp_path / "missing"}, {"--checkpoint": tmp_path / "not-there"})
    with pytest.raises(CaptionerError, match="name the same file"):
        refuse_overlap({"--out": tmp_path / "x.jsonl", "--html": tmp_path / "x.jsonl"}, {})


def test_a_replaced_folder_is_swapped_in_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            assert (out / "old.txt").read_text() == "old"  # untouched while the new one is built
            raise RuntimeError("the writer failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and os.listdir(out) == ["old.txt"]

    real_replace, calls = os.replace, []

    def swap_fails(src, dst):  # the old folder is moved aside, then moving the new one in fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", swap_fails)
    with pytest.raises(CaptionerError, match="No space left"):
        with atomic_folder(out, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert os.listdir(out) == ["old.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with atomic_folder(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_symlinked_output_folder_is_written_through(w, tmp_path):
    target = tmp_path / "real-model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # an earlier model folder, replaced with --overwrite
    link = tmp_path / "model"
    link.symlink_to(target)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--checkpoint", str(w / "ok.pt"), "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.safetensors").is_file() and json.loads((target / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "real-model"]  # no temporary left
