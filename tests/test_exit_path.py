"""The one exit path (engine/runtime/exit.py): every way a command can end gives one line and the right status,
never a traceback and never a hang; workers die with their parent; a stop is honoured within seconds, also
while training precomputes its features; a device the machine lacks is one line naming the ones it has."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.cli import main
from captioner.engine.runtime.device import available_devices, resolve_device
from captioner.engine.runtime.exit import describe, with_exit_path
from captioner.engine.runtime.signals import StopRequest, Stopped
from captioner.errors import CaptionerError, EnvironmentFailure

from helpers import ROOT, SMALL_MODEL, TINY, metric_lines, small_config, small_overrides, step_losses, \
    untrained_checkpoint, weights


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny untrained checkpoint and a folder of 12 small photos."""
    folder = tmp_path_factory.mktemp("exit-path")
    untrained_checkpoint(folder / "ok.pt", *SMALL_MODEL, "decode.max_len=4")
    photos = folder / "photos"
    photos.mkdir()
    for i in range(12):
        Image.new("RGB", (24, 24), (20 * i, 100, 200 - 10 * i)).save(photos / f"p{i:02d}.png")
    return folder


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("captioner ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- how each kind of ending is reported


@pytest.mark.parametrize("error, status, says", [
    (CaptionerError("config key 'x' is wrong"), 2, "error: config key 'x' is wrong"),
    (EnvironmentFailure("cannot write a.json: No space left on device"), 1, "No space left on device"),
    (OSError(errno.ENOSPC, "No space left on device", "out.jsonl"), 1, "out.jsonl: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/x"), 1, "Read-only file system"),
    (OSError(errno.EACCES, "Permission denied", "/root/x"), 2, "Permission denied"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "gone.jpg"), 2, "gone.jpg"),
    (Stopped("SIGTERM"), 143, "stopped by SIGTERM"),
    (Stopped("SIGINT"), 130, "stopped by SIGINT"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (MemoryError(), 1, "out of memory"),
    (ValueError("math domain error"), 1, "internal error: ValueError: math domain error"),
    (RuntimeError("line one\nline two"), 1, "internal error: RuntimeError: line one"),
])
def test_every_ending_is_one_line_and_its_status(error, status, says, capsys):
    def fail():
        raise error
    assert with_exit_path("demo", fail) == status
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("captioner demo: ") and says in line, line


GLOO_PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                  "[127.0.0.1]:10404. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("error", [RuntimeError(GLOO_PEER_GONE), ConnectionResetError(104, "Connection reset by peer")])
def test_a_process_whose_torchrun_peer_died_says_so_not_internal_error(error, capsys, monkeypatch):
    def fail():
        raise error
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert with_exit_path("train", fail) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "lost contact with another process of this torchrun run" in line and "rerun the same command" in line
    assert "internal error" not in line and "bug" not in line
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the same error is still this process's own
    with_exit_path("train", fail)
    assert "lost contact" not in capsys.readouterr().err


def test_a_message_quoting_line_breaks_stays_one_line(capsys):
    def fail():
        raise CaptionerError("unknown config key 'a\nb\u2028c'")
    assert with_exit_path("train", fail) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a\\nb\\u2028c" in err
    # the same one line where no CLI prints it: the Python API's caller reads str(error)
    error = CaptionerError("checkpoint 0\n not found").with_context("model.pt: ")
    assert str(error) == "model.pt: checkpoint 0\\n not found" and isinstance(error, ValueError)


def test_status_of_a_closed_pipe_is_quiet():
    assert describe(OSError(errno.EIO, "Input/output error"))[0] == 1


def test_stop_request_raises_outside_deferred_blocks_and_records_inside():
    with StopRequest() as stop:
        with pytest.raises(Stopped) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.signal == "SIGTERM"
        with stop.deferred():
            signal.raise_signal(signal.SIGTERM)  # recorded only: the loop acts at its next safe point
            assert stop.signal == "SIGTERM"
            with pytest.raises(Stopped):  # a second Ctrl-C while saving: now
                signal.raise_signal(signal.SIGINT)
        with pytest.raises(Stopped):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


def test_a_stop_signal_ends_any_long_loop_of_a_command_within_seconds(capsys):
    # Any loop (captioning, extraction, scoring): SIGTERM raises Stopped at once, not after the loop's work.
    def minutes_of_work():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sum(range(1000))
        return 0
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    timer.start()
    try:
        assert with_exit_path("caption", minutes_of_work) == 143
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5
    assert "stopped by SIGTERM" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- a full disk during caption, in process


def test_full_disk_during_caption_is_one_line_exit_1_and_a_rerun_completes(inputs, tmp_path, monkeypatch):
    from captioner.engine.outputs import captions_file
    out = tmp_path / "captions.jsonl"
    argv = ["caption", "--checkpoint", str(inputs / "ok.pt"), str(inputs / "photos"), "--out", str(out),
            "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    real_sync, calls = captions_file.AppendLog._sync, []

    def sync_until_full(self):
        calls.append(1)
        if len(calls) < 2:
            return real_sync(self)
        # The second batch: the disk filled up 10 bytes into its first line.
        self._file.flush()
        first_batch = b"".join(self.path.read_bytes().splitlines(keepends=True)[:4])
        self._file.truncate(len(first_batch) + 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(captions_file.AppendLog, "_sync", sync_until_full)
    code, _, err = _run(argv)
    assert code == 1, err
    assert "No space left on device" in _one_error_line(err) and str(out) in err
    monkeypatch.setattr(captions_file.AppendLog, "_sync", real_sync)
    code, stdout, err = _run(argv)  # space again: the rerun resumes after the first batch
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["skipped"] == 4 and summary["captioned"] == 8
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in records) == [f"p{i:02d}.png" for i in range(12)]  # no duplicate


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "hpu", "cuda:7", "cuda:64", "vulkan", "cpu:3", "gpu",
                                  "nonsense", "cuda:-1"])
def test_a_device_the_machine_lacks_is_one_line_naming_what_it_has(name, inputs, capsys):
    if name in available_devices():
        pytest.skip(f"this machine has {name}")
    with pytest.raises(CaptionerError) as refused:
        resolve_device(name)
    message = str(refused.value)
    assert f"--device {name}" in message and "this machine has: cpu" in message
    code, _, err = _run(["caption", "--checkpoint", str(inputs / "ok.pt"), str(inputs / "photos"), "--device", name,
                         "--out", str(inputs / "never.jsonl")])
    assert code == 2 and "this machine has: cpu" in _one_error_line(err)
    assert not (inputs / "never.jsonl").exists()


def test_devices_the_machine_has_resolve():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for name in available_devices():
        assert resolve_device(name).type == name.split(":")[0]


# ---------------------------------------------------------------- through real processes


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return path


def _python(script: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_an_error_while_workers_are_busy_exits_at_once(inputs, tmp_path):
    """The issue's hang: an error escapes `caption --workers 2` while its workers decode (slowly) and ignore
    SIGTERM; Python's exit hook used to wait for them forever."""
    script = _script(tmp_path, """
        import errno, sys, time
        from captioner.data import images
        from captioner.engine.outputs import captions_file

        real_read = images.read_image
        def slow_read(path, *args, **kw):  # in the workers: every image after the first few takes a minute
            if not path.endswith(("p00.png", "p01.png")):
                time.sleep(60)
            return real_read(path, *args, **kw)
        images.read_image = slow_read

        def full(self, lines):
            raise OSError(errno.ENOSPC, "No space left on device")
        captions_file.AppendLog.append = full

        from captioner.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    start = time.monotonic()
    process = _python(script, "caption", "--checkpoint", str(inputs / "ok.pt"), str(inputs / "photos"), "--out",
                      str(tmp_path / "c.jsonl"), "--device", "cpu", "--workers", "2", "--batch-size", "2")
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("caption hung after an error with busy workers")
    seconds = time.monotonic() - start
    err = err.decode()
    assert process.returncode == 1, err
    assert "No space left on device" in _one_error_line(err)
    assert seconds < 60, f"took {seconds:.0f}s: it waited for a worker"


@pytest.mark.slow
def test_workers_die_with_their_parent_even_on_sigkill(tmp_path):
    script = _script(tmp_path, """
        import multiprocessing, sys, time
        import torch
        from captioner.data.pipeline import image_batches
        from PIL import Image
        folder = sys.argv[1]
        paths = []
        for i in range(64):
            Image.new("RGB", (16, 16)).save(f"{folder}/{i}.png")
            paths.append(f"{folder}/{i}.png")
        batches = iter(image_batches(paths, 32, 1, 2, torch.device("cpu")))
        next(batches)
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(600)
    """)
    process = _python(script, str(tmp_path))
    pids = [int(p) for p in process.stdout.readline().split()]
    assert len(pids) == 2, process.stderr.read()
    process.kill()  # SIGKILL: no handler, no exit hook runs in the parent
    process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "workers outlived their parent"


@pytest.mark.slow
def test_ctrl_c_while_training_precomputes_features_stops_within_seconds(tmp_path):
    # ResNet-50 at 224 on 1 thread: precomputing 200 images' features takes minutes on 2 shared cores.
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "captioner", "train", "--config", str(TINY), "--run-dir", str(run_dir),
         "--device", "cpu", f"dataset.root={tmp_path / 'data'}", "dataset.synthetic_images=250",
         "encoder.arch=resnet50", "encoder.image_size=224", "compute.num_workers=2", "train.num_workers=0",
         "compute.encode_batch_size=4", "train.precompute_features=true"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (run_dir / "config.yaml").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # config.yaml is written just before the features are computed
    assert process.poll() is None, process.stderr.read().decode()
    time.sleep(3)  # well inside the precompute
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("Ctrl-C during feature precompute was not honoured within 60 s")
    seconds = time.monotonic() - sent
    err = err.decode()
    assert process.returncode == 130, err
    assert "stopped by SIGINT" in _one_error_line(err)
    assert seconds < 45, f"stopped {seconds:.0f}s after Ctrl-C"  # one batch of 4 images; minutes before
    assert not (run_dir / "last.pt").exists()  # nothing trained, nothing saved


@pytest.mark.slow
def test_stdout_full_or_closed_is_one_line_exit_1():
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "captioner", "layers", "resnet18"], cwd=ROOT, stdout=full,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "cannot write standard output: No space left on device" in _one_error_line(err)
    assert "Exception ignored" not in err
    closed = subprocess.run([sys.executable, "-m", "captioner", "layers", "resnet18"], cwd=ROOT, stdout=None,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
                            preexec_fn=lambda: os.close(1))  # `captioner layers resnet18 >&-`
    err = closed.stderr.decode()
    assert closed.returncode == 1 and "cannot write standard output: it is closed" in _one_error_line(err), err


@pytest.mark.slow
def test_a_stop_during_validation_saves_the_epoch_and_the_resumed_run_validates_it_first(small_root, tmp_path,
                                                                                           monkeypatch, capsys):
    from captioner.engine.train import validation
    from captioner.jobs import train

    straight = tmp_path / "straight"
    assert train.main(train.TrainJob(small_config(small_root), straight, "cpu"))["stopped"] is None
    real_predict, calls = validation.predict, []

    def predict_then_terminate(*args, **kwargs):  # SIGTERM arrives as epoch 1's validation starts
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_predict(*args, **kwargs)
    monkeypatch.setattr(validation, "predict", predict_then_terminate)
    stopped = tmp_path / "stopped"
    argv = ["-q", "train", "--config", str(TINY), "--run-dir", str(stopped), "--device", "cpu",
            *small_overrides(small_root)]
    assert main(argv) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    state = torch.load(stopped / "last.pt", weights_only=True)
    assert state["step"] == 9 and state["progress"]["epoch"] == 0  # epoch 1's steps, not its validation
    assert not [x for x in metric_lines(stopped) if "val_bleu4" in x]
    monkeypatch.setattr(validation, "predict", real_predict)
    assert main(argv) == 0  # the same command resumes: epoch 1 is validated, then epoch 2 trained
    assert step_losses(stopped) == step_losses(straight)
    val = lambda d: [(x["step"], x["val_bleu4"]) for x in metric_lines(d) if "val_bleu4" in x]  # noqa: E731
    assert val(stopped) == val(straight) and len(val(straight)) == 2
    a, b = weights(straight / "last.pt"), weights(stopped / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
