"""Files a team can share: every file captioner writes gets the mode the user's umask gives (0644 under 022,
0600 under 077), whichever way it is written, and a model folder holds no absolute path of the machine that
made it. The umask is process-wide: each test sets it and restores it in `finally`."""
from __future__ import annotations

import importlib.util
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from captioner.files import atomic_folder, atomic_write, current_umask, write_json

UMASKS = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}  # umask -> (file mode, folder mode)


@contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def modes(*roots: Path) -> dict[str, int]:
    """{path: permission bits} of every file and folder under roots (links not followed)."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                found[str(path)] = stat.S_IMODE(path.stat().st_mode)
    return found


def assert_modes(roots: list[Path], file_mode: int, folder_mode: int) -> None:
    wrong = {p: oct(m) for p, m in modes(*roots).items()
             if m != (folder_mode if Path(p).is_dir() else file_mode)}
    assert not wrong, f"expected {oct(file_mode)} files, {oct(folder_mode)} folders: {wrong}"


def test_the_umask_is_read_without_changing_it():
    with umask(0o027):
        assert current_umask() == 0o027 and os.umask(0o027) == 0o027


@pytest.mark.parametrize("mask", UMASKS)
def test_atomic_writes_follow_the_umask(mask, tmp_path):
    file_mode, folder_mode = UMASKS[mask]
    with umask(mask):
        probe = tmp_path / "probe.json"
        with atomic_write(probe, "probe") as f:  # the check a before-stop hook runs
            f.write(b"{}")
        target = tmp_path / "elsewhere" / "real.json"
        write_json(target, {"a": 1})
        os.chmod(target, 0o600)  # an older private file: replacing it gives the umask's mode, as a new file would
        (tmp_path / "link.json").symlink_to(target)
        write_json(tmp_path / "link.json", {"a": 2})  # through the link, into its target
        assert (tmp_path / "link.json").is_symlink() and target.read_text() == '{\n  "a": 2\n}\n'
        with atomic_folder(tmp_path / "model", "model folder") as folder:
            write_json(folder / "config.json", {})
            (folder / "sub").mkdir()
            (folder / "sub" / "plain.bin").write_bytes(b"x")
    assert stat.S_IMODE(probe.stat().st_mode) == file_mode
    assert_modes([tmp_path / "elsewhere", tmp_path / "model"], file_mode, folder_mode)


@pytest.mark.slow  # trains a small model for an epoch, exports, quantizes, captions and plots, twice
@pytest.mark.parametrize("mask", UMASKS)
def test_every_file_of_a_run_export_and_captions_follows_the_umask(mask, tmp_path):
    from captioner.jobs import caption, evaluate, export, extract, plot, train
    from helpers import small_config
    file_mode, folder_mode = UMASKS[mask]
    data, cache, run = tmp_path / "data", tmp_path / "cache", tmp_path / "run"
    outputs = tmp_path / "outputs"
    onnx = importlib.util.find_spec("onnxruntime") is not None  # the [onnx] extra: its folder too when installed
    with umask(mask):
        cfg = small_config(data, "train.epochs=1", f"cache.dir={cache}")
        extract.main(extract.ExtractJob(cfg, device="cpu"))  # the feature cache, written in place
        summary = train.main(train.TrainJob(cfg, run, "cpu"))
        metrics = evaluate.main(evaluate.EvaluateJob(summary["best_checkpoint"], "test", device="cpu"))
        plot.main(plot.PlotJob(run))
        folders = [outputs / "model", outputs / "onnx-int8"]
        export.main(export.ExportJob(summary["best_checkpoint"], str(folders[0]), metrics=metrics["metrics_file"]))
        if onnx:
            export.main(export.ExportJob(summary["best_checkpoint"], str(folders[1]), format="onnx", quantize="int8",
                                         calibration_images=4))
        images = data / "images"
        caption.main(caption.CaptionJob(str(folders[0]), [str(images)], out=str(outputs / "captions.jsonl"),
                                        html=str(outputs / "gallery.html"), device="cpu", num_workers=0))
    assert (run / "curves.png").is_file() and (outputs / "gallery.html").is_file()
    assert list(cache.rglob("*")) and (folders[0] / "README.md").is_file()
    assert_modes([data, cache, run, outputs], file_mode, folder_mode)
    if mask == 0o022:  # the same model folders hold no path of this machine's data, cache or run
        for folder in folders if onnx else folders[:1]:
            for path in folder.iterdir():
                content = path.read_bytes()
                for place in (data, cache, run, tmp_path):
                    assert str(place).encode() not in content, f"{path.name} holds {place}"
