"""Outputs are tested for writability before any work, with a real create-and-remove (a permission check cannot
see a read-only mount, nor what root may do), and a symbolic link to an output is written through to its
target."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.files import check_writable, write_json

from helpers import SMALL_MODEL, TINY, untrained_checkpoint

SMALL = [*SMALL_MODEL, "decode.max_len=4", "dataset.synthetic_images=12"]


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A folder no file can be created in: a read-only tmpfs mount as root (who ignores permissions), else a
    folder without write permission."""
    folder = tmp_path_factory.mktemp("read-only")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("writability")
    untrained_checkpoint(folder / "ok.pt", *SMALL, f"dataset.root={folder / 'data'}")
    (folder / "photos").mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "photos" / "a.png")
    (folder / "results.json").write_text(json.dumps([{"image_id": 1, "caption": "a red square"}]))
    (folder / "refs.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                  "annotations": [{"image_id": 1, "caption": "a red square"}]}))
    (folder / "run").mkdir()
    (folder / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return folder


def test_check_writable_creates_and_removes_a_file(tmp_path, read_only):
    check_writable(tmp_path / "new" / "deeper" / "out.json")  # missing folders: tested where they would be made
    check_writable(tmp_path / "out", folder=True)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, no folder made
    for path, folder in ((read_only / "out.json", False), (read_only / "sub" / "x.json", False),
                         (read_only / "run", True)):
        with pytest.raises(CaptionerError, match="cannot write") as refused:
            check_writable(path, "output", folder=folder)
        assert refused.value.exit_status in (1, 2)  # 1: read-only file system (the machine); 2: no permission


ROWS = ("evaluate --out", "caption --out", "caption --html", "train --run-dir", "extract cache.dir", "prepare --out",
        "score --out", "plot --out", "bench --json", "demo --out", "export --out")


def _rows(w: Path, ro: Path) -> dict:
    """what -> (what, argv, the job step that must not start) for every command that writes."""
    data = [f"dataset.root={w / 'data'}", *SMALL]
    rows = [
        ("evaluate --out", ["evaluate", "--checkpoint", str(w / "ok.pt"), "--out", str(ro / "eval"), "--device",
                            "cpu", f"dataset.root={w / 'data'}"], "captioner.jobs.evaluate.load_for_job"),
        ("caption --out", ["caption", "--checkpoint", str(w / "ok.pt"), str(w / "photos"), "--out",
                           str(ro / "c.jsonl"), "--device", "cpu", "--workers", "0"],
         "captioner.jobs.caption.load_for_job"),
        ("caption --html", ["caption", "--checkpoint", str(w / "ok.pt"), str(w / "photos"), "--out",
                            str(w / "c.jsonl"), "--html", str(ro / "g.html"), "--device", "cpu", "--workers", "0"],
         "captioner.jobs.caption.load_for_job"),
        ("train --run-dir", ["train", "--config", str(TINY), "--run-dir", str(ro / "run"), "--device", "cpu", *data],
         "captioner.jobs.train.load_records"),
        ("extract cache.dir", ["extract", "--config", str(TINY), "--device", "cpu", *data,
                               f"cache.dir={ro / 'cache'}"], "captioner.jobs.extract.build_encoder"),
        ("prepare --out", ["prepare", "--config", str(TINY), "--out", str(ro / "prepared"), *data],
         "captioner.jobs.prepare.read_dataset"),
        ("score --out", ["score", "--no-meteor", "--results", str(w / "results.json"), "--annotations",
                         str(w / "refs.json"), "--out", str(ro / "m.json")], "captioner.jobs.score.read_results"),
        ("plot --out", ["plot", str(w / "run"), "--out", str(ro / "curves.png")], None),
        ("bench --json", ["bench", "--smoke", "--device", "cpu", "--json", str(ro / "b.json")],
         "captioner.jobs.bench.job.measure_all"),
        ("demo --out", ["demo", "--out", str(ro / "demo"), "--device", "cpu"], "captioner.jobs.train.main"),
        ("export --out", ["export", "--checkpoint", str(w / "ok.pt"), "--out", str(ro / "model")],
         "captioner.jobs.export.resolve_model"),
    ]
    return {row[0]: row for row in rows}


def test_the_table_covers_every_command_that_writes(inputs, read_only):
    from captioner.cli import COMMANDS
    assert set(_rows(inputs, read_only)) == set(ROWS)
    silent = {"serve", "layers"}  # no output file: an HTTP server, a table on stdout
    assert {what.split()[0] for what in ROWS} == set(COMMANDS) - silent


@pytest.mark.parametrize("row", ROWS)
def test_every_command_refuses_an_unwritable_output_before_any_work(row, inputs, read_only, monkeypatch):
    what, argv, work = _rows(inputs, read_only)[row]
    if work:
        def started(*args, **kwargs):
            raise AssertionError(f"{what}: the work started before the output was tested")
        monkeypatch.setattr(work, started)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    err = err.getvalue()
    assert code in (1, 2), f"{what}: exit {code}\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("captioner ")]
    assert len(lines) == 1 and "cannot write" in lines[0] and "Traceback" not in err, err
    assert str(read_only) in lines[0]


def test_a_symlinked_output_is_written_through_to_its_target(inputs, tmp_path):
    target = tmp_path / "real" / "metrics.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["score", "--no-meteor", "--results", str(inputs / "results.json"), "--annotations",
                     str(inputs / "refs.json"), "--out", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text())["images"] == 1
    write_json(link, {"again": 1})  # the one atomic write: the link stays, its target is replaced
    assert link.is_symlink() and json.loads(target.read_text()) == {"again": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # no temporary left
