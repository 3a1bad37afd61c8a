"""Loading "owner/name" from a Hugging Face Hub that stalls: a Hub (or proxy) that accepts the connection and
never answers fails within $CAPTIONER_HUB_TIMEOUT seconds in one line naming the endpoint and the repo (it used
to hang forever); a slow but steady download is not cut off; huggingface_hub's own messages are not cut
mid-word. The Hub is a server on 127.0.0.1 (tests/downloads.py), the cache an empty HF_HOME under tmp_path."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from captioner import Captioner, CaptionerError
from captioner.cli import main as cli
from captioner.engine.infer import hub
from captioner.errors import first_line, shorten
from captioner.jobs.export import ExportJob, main as export

from downloads import LoopbackServer, SilentServer, hub_repo, serve_hub
from helpers import ROOT, photo_zoo

pytest.importorskip("huggingface_hub")

REPO = "alice/shapes"


@pytest.fixture
def photo(tmp_path):
    return photo_zoo(tmp_path / "zoo", max_side=64)["photo.jpg"]


def test_a_hub_that_never_answers_fails_in_one_line_within_the_timeout(loopback_hub, photo, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv(hub.TIMEOUT_VARIABLE, "2")
    monkeypatch.chdir(tmp_path)  # REPO is no local path here
    with SilentServer() as server:
        serve_hub(monkeypatch, server.url)
        start = time.monotonic()
        with pytest.raises(CaptionerError) as e:
            Captioner.from_pretrained(REPO, "cpu")
        assert time.monotonic() - start < 30  # 2 s per request (huggingface_hub's own 3 s lookup aside)
        message = str(e.value)
        assert f"{REPO} is not a file or folder here, and the connection to the Hugging Face Hub at {server.url} " \
               f"timed out (no answer in 2 s; {hub.TIMEOUT_VARIABLE} sets it)" in message
        assert "HF_HUB_OFFLINE=1" in message and "local model folder" in message

        assert cli(["caption", "--checkpoint", REPO, str(photo), "--device", "cpu", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and f"Hugging Face Hub at {server.url}" in err
        assert server.connections >= 1


def test_a_slow_but_steady_hub_download_is_not_cut_off(loopback_hub, tiny_checkpoint, tmp_path, monkeypatch):
    """Each answer dribbles out over 1.4 s, a pause of 0.2 s at a time: a 0.8 s timeout bounds the pauses only."""
    folder = tmp_path / "model"
    export(ExportJob(tiny_checkpoint, str(folder)))
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setenv(hub.TIMEOUT_VARIABLE, "0.8")
    monkeypatch.chdir(tmp_path)
    with LoopbackServer(*hub_repo(REPO, files), drip=0.2) as server:
        serve_hub(monkeypatch, server.url(""))
        loaded = Captioner.from_pretrained(REPO, "cpu")
    assert f"GET /api/models/{REPO}/revision/main" in server.requests
    assert sorted(p.removeprefix(f"/{REPO}/resolve/{'1' * 40}/") for p in server.downloads if "resolve" in p) \
        == sorted(files)
    assert loaded.predictor.model_hash() == Captioner.from_pretrained(folder, "cpu").predictor.model_hash()


def test_the_timeout_hook_leaves_other_huggingface_hub_calls_alone(loopback_hub, monkeypatch):
    """The hook captioner adds to huggingface_hub's shared client acts inside its download only: elsewhere a
    request keeps the timeout its caller gave, None (no limit) included; inside, only a missing one is filled."""
    import huggingface_hub

    with SilentServer() as server:
        serve_hub(monkeypatch, server.url)
        monkeypatch.setenv(hub.TIMEOUT_VARIABLE, "0.5")
        with pytest.raises(CaptionerError, match="timed out"):
            hub.download(REPO)
    session = huggingface_hub.get_session()
    assert hub._bound_timeouts in session.event_hooks["request"]
    unbounded = session.build_request("GET", server.url, timeout=None)
    hub._bound_timeouts(unbounded)
    assert set(unbounded.extensions["timeout"].values()) == {None}
    token = hub._TIMEOUT.set(2.0)
    try:
        hub._bound_timeouts(unbounded)
        given = session.build_request("GET", server.url, timeout=30)
        hub._bound_timeouts(given)
    finally:
        hub._TIMEOUT.reset(token)
    assert set(unbounded.extensions["timeout"].values()) == {2.0}
    assert set(given.extensions["timeout"].values()) == {30}


def test_offline_message_is_whole_and_a_bad_timeout_is_one_line(loopback_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CaptionerError) as e:
        hub.download(REPO)
    # huggingface_hub's line, once cut at 200 characters ("... set 'HF_HUB_OFFLINE)"), is whole
    assert "set 'HF_HUB_OFFLINE=0' as environment variable" in str(e.value)
    assert shorten("word " * 100, 42) == "word word word word word word word word ..."
    # a library's reason quoted in our line is cut between words, never inside one ("try aga")
    assert first_line(OSError("We could not connect; please try again later.\nmore"), 38) == \
        "We could not connect; please try ..."
    assert first_line(RuntimeError()) == "RuntimeError"

    monkeypatch.setenv(hub.TIMEOUT_VARIABLE, "soon")
    with pytest.raises(CaptionerError, match=f"{hub.TIMEOUT_VARIABLE}='soon' is not a number of seconds"):
        hub.download(REPO)


@pytest.mark.slow  # spawns `captioner caption`, as the tester ran it
def test_caption_command_against_a_silent_hub_endpoint(tmp_path, photo):
    with SilentServer() as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT),
               hub.TIMEOUT_VARIABLE: "2"}
        env.pop("HF_HUB_OFFLINE", None)
        start = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "captioner", "caption", "--checkpoint", REPO, str(photo),
                              "--device", "cpu", "--workers", "0"], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=120)
        elapsed = time.monotonic() - start
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert f"{REPO} is not a file or folder here, and the connection to the Hugging Face Hub at {server.url} " \
           f"timed out (no answer in 2 s" in run.stderr
    assert elapsed < 60
