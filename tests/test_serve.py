"""`captioner serve` through a real HTTP client on a free loopback port: same captions as `captioner caption`,
batching across requests, every bad upload a 4xx JSON answer, limits, token, graceful SIGTERM, the page."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason='the [serve] extra is not installed: pip install -e ".[serve]"')
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from captioner.data.images import read_image  # noqa: E402
from captioner.engine.serve.batcher import DynamicBatcher  # noqa: E402
from captioner.engine.serve.limits import Limits  # noqa: E402
from captioner.engine.serve.webapp import create_app  # noqa: E402
from captioner.jobs import caption, serve  # noqa: E402

from chromium import BINARY, Chromium  # noqa: E402
from helpers import ROOT  # noqa: E402

pytestmark = pytest.mark.slow  # every test serves

GOOD = ["photo.jpg", "cmyk.jpg", "alpha.png", "very_wide.jpg", "rotated_exif.jpg", "grey16.png"]
PATH_KINDS = {"broken_link.jpg", "loop.jpg", "fifo.jpg", "unreadable.jpg"}  # no bytes to upload: paths only


class Running:
    """A uvicorn server in a thread on a free loopback port (signals stay with the test process)."""

    def __init__(self, app, **config):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app, _ = serve.build(serve.ServeJob(tiny_checkpoint, device="cpu", max_batch=8, max_wait_ms=1))
    running = Running(app)
    yield running
    running.stop()


def _post(url: str, files: list[tuple[str, bytes]], **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/caption", files=[("image", (name, data)) for name, data in files], timeout=60,
                      **kwargs)


def _upload(folder: Path, names: list[str]) -> list[tuple[str, bytes]]:
    return [(name, (folder / name).read_bytes()) for name in names]


def test_captions_equal_the_caption_command(server, mixed, tiny_checkpoint, tmp_path):
    folder, _, _ = mixed
    out = tmp_path / "captions.jsonl"
    caption.main(caption.CaptionJob(tiny_checkpoint, [str(folder / n) for n in GOOD], out=str(out), device="cpu", num_workers=0))
    expected = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    response = _post(server.url, _upload(folder, GOOD))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["name"] for r in results] == GOOD
    for r in results:
        assert r["caption"] == expected[r["name"]]["caption"]
        assert r["score"] == pytest.approx(expected[r["name"]]["score"], abs=1e-3)
        assert (r["width"], r["height"]) == read_image(str(folder / r["name"]), 8)[1]
        assert [w["word"] for w in r["words"]] == r["caption"].split()
        attention = np.array([w["attention"] for w in r["words"]])
        assert attention.shape == (len(r["words"]), 4, 4)  # (L, H, W) on the tiny model's 4x4 grid
        assert np.allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-2)
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["grid"] == [4, 4] and info["arch"] == "resnet18" and info["decoding"]["beam_size"] == 3
    assert info["stats"]["images"] >= len(GOOD)


def test_generation_fields_choose_this_requests_captions(server, mixed):
    """Text fields beside the images: Captioner.caption's keywords, checked as the config checks them."""
    folder, _, _ = mixed
    url = f"{server.url}/v1/caption"
    files = [("image", (n, (folder / n).read_bytes())) for n in GOOD[:2]]
    plain = httpx.post(url, files=files, timeout=60).json()["results"]
    nbest = httpx.post(url, files=files, data={"num_beams": "3", "num_return_sequences": "3"}, timeout=60)
    assert nbest.status_code == 200, nbest.text
    for one, many in zip(plain, nbest.json()["results"]):
        assert "sequences" not in one and len(many["sequences"]) == 3
        assert many["sequences"][0] == {"caption": one["caption"], "score": one["score"]}
    greedy = httpx.post(url, files=files, data={"sample": "true", "top_k": "1"}, timeout=60).json()["results"]
    assert [r["caption"] for r in greedy] == [r["caption"] for r in
                                              httpx.post(url, files=files, data={"beam_size": "1"}, timeout=60)
                                              .json()["results"]]
    for data, words in [({"top_p": "2"}, "decode.top_p must be in (0, 1]"), ({"beam_size": "99"}, "limit of 16"),
                        ({"num_return_sequences": "5"}, "decode.num_return_sequences (5) needs"),
                        ({"colour": "red"}, "unknown generation setting 'colour'")]:
        refused = httpx.post(url, files=files, data=data, timeout=60)
        assert refused.status_code == 400 and words in refused.json()["error"], refused.text


def test_concurrent_requests_share_a_batch(tiny_checkpoint, mixed, server):
    folder, _, _ = mixed
    names = GOOD[:4]
    alone = {n: _post(server.url, _upload(folder, [n])).json()["results"][0] for n in names}
    app, _ = serve.build(serve.ServeJob(tiny_checkpoint, device="cpu", max_batch=4, max_wait_ms=5000))
    batching = Running(app)
    try:
        with ThreadPoolExecutor(4) as pool:  # four requests at once: one batch of 4, well before the 5 s wait
            start = time.perf_counter()
            answers = list(pool.map(lambda n: _post(batching.url, _upload(folder, [n])), names))
            seconds = time.perf_counter() - start
        stats = httpx.get(f"{batching.url}/v1/model").json()["stats"]
    finally:
        batching.stop()
    assert seconds < 5 and stats["batch_sizes"] == {"4": 1}
    for name, answer in zip(names, answers):
        result = answer.json()["results"][0]
        assert result["batch_size"] == 4
        assert result["caption"] == alone[name]["caption"] and result["words"] == alone[name]["words"]
        assert result["score"] == pytest.approx(alone[name]["score"], abs=1e-3)


def test_every_bad_upload_is_a_4xx_json_error(server, mixed):
    folder, _, bad = mixed
    # The server's pixel limit is lower than the command's: a bomb's message names the limit, not always its size.
    kinds = {name: "above the limit" if "above the limit" in words else words
             for name, words in bad.items() if name not in PATH_KINDS}
    assert len(kinds) >= 7
    for name, words in kinds.items():
        response = _post(server.url, [(name, (folder / name).read_bytes())])
        assert response.status_code == 422, name
        assert words in response.json()["results"][0]["error"] and "error" in response.json(), name
    # One bad file among good ones: its error in its place, the others captioned.
    mixed_answer = _post(server.url, _upload(folder, ["photo.jpg", "text.jpg", "alpha.png"]))
    assert mixed_answer.status_code == 200
    assert [("caption" in r, "error" in r) for r in mixed_answer.json()["results"]] == [(1, 0), (0, 1), (1, 0)]
    url = f"{server.url}/v1/caption"
    malformed = [
        (httpx.post(url, files={"photo": ("a.jpg", b"x")}), 400, "no `image` field"),
        (httpx.post(url, data={"image": str(folder / "photo.jpg")}, files={"x": ("x", b"")}), 400, "paths and URLs"),
        (httpx.post(url, data={"image": "https://example.com/a.jpg"}), 415, "multipart"),
        (httpx.post(url, content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=xx"}),
         400, "`image`"),
        (httpx.post(url, content=b"\xff\xd8", headers={"content-type": "image/jpeg"}), 415, "multipart"),
        (httpx.post(url, content=b"abc", headers={"content-type": "multipart/form-data"}), 400,
         "malformed form: Missing boundary"),  # not "(at most 32 images per request)", which is not what is wrong
        (httpx.get(url), 405, ""),
        (httpx.get(f"{server.url}/v2/nothing"), 404, ""),
    ]
    for response, status, words in malformed:
        assert response.status_code == status and words in response.json()["error"], response.text
        assert "images per request" not in response.json()["error"], response.text
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    assert _post(server.url, _upload(folder, ["photo.jpg"])).status_code == 200  # still serving


def _fake_predict(release: threading.Event, entered: threading.Event | None = None):
    """A model that answers once release is set (entered: set when a batch reaches it)."""
    def predict(items):
        if entered is not None:
            entered.set()
        release.wait(30)
        return [{"caption": "a thing", "score": -1.0, "words": ["a", "thing"], "alphas": np.full((2, 4), 0.25),
                 "batch_size": len(items)} for _ in items]
    return predict


def _png_bytes(width: int = 16, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_limits_full_queue_and_timeout():
    release, entered = threading.Event(), threading.Event()
    batcher = DynamicBatcher(_fake_predict(release, entered), max_batch=1, max_wait=0, capacity=1)
    limits = Limits(max_upload_bytes=20_000, max_images=2, max_pixels=5_000, timeout=30)
    running = Running(create_app(batcher, {"checkpoint": "fake"}, 32, (2, 2), limits))
    try:
        url, png = running.url, _png_bytes()
        assert _post(url, [("big.bin", b"\0" * 30_000)]).status_code == 413  # declared length: refused unread
        chunked = httpx.post(f"{url}/v1/caption", content=iter([b"--b\r\n", b"\0" * 30_000]),
                             headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413 and "above the limit" in chunked.json()["error"]
        many = _post(url, [("a.png", png)] * 3)
        assert many.status_code == 413 and "at most 2 images" in many.json()["error"]
        bomb = _post(url, [("wide.png", _png_bytes(100, 100))])
        assert bomb.status_code == 422 and "100x100 is above the limit of 5000" in bomb.json()["results"][0]["error"]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, url, [("a.png", png)])
            assert entered.wait(20)  # the model holds the first image and does not return
            second = pool.submit(_post, url, [("b.png", png)])  # fills the queue of 1
            deadline = time.time() + 20
            while batcher.queued < 1 and time.time() < deadline:
                time.sleep(0.02)
            full = _post(url, [("c.png", png)])
            assert full.status_code == 503 and full.headers["retry-after"] == "1" and "busy" in full.json()["error"]
            assert httpx.get(f"{url}/healthz").status_code == 200  # the blocked model never blocks the server
            release.set()
            assert first.result().status_code == second.result().status_code == 200
        assert first.result().json()["results"][0]["caption"] == "a thing"
    finally:
        release.set()
        running.stop()
    slow = threading.Event()
    running = Running(create_app(DynamicBatcher(_fake_predict(slow), 1, 0, 4), {}, 32, (2, 2), Limits(timeout=0.5)))
    try:
        late = _post(running.url, [("a.png", _png_bytes())])
        assert late.status_code == 504 and "within 0.5s" in late.json()["error"]
    finally:
        slow.set()
        running.stop()


def test_an_upload_cut_off_by_a_stop_gives_no_traceback(capfd):
    """SIGTERM lets requests finish for a grace period; an upload still arriving after it is cancelled, which
    uvicorn would log as a 60-line "Exception in ASGI application" traceback."""
    batcher = DynamicBatcher(_fake_predict(threading.Event()), 1, 0, 4)
    running = Running(create_app(batcher, {}, 32, (2, 2), Limits()), timeout_graceful_shutdown=1)
    port = int(running.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as slow:  # announces 10 kB, sends 10 bytes, then waits
        slow.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 10000\r\n\r\n--b\r\nxxxxx")
        time.sleep(0.5)
        running.stop()
    assert not running.thread.is_alive()
    err = capfd.readouterr().err  # uvicorn's own loggers write to stderr, past logging's capture
    assert "graceful shutdown exceeded" in err  # the cut-off did happen
    assert "Exception in ASGI application" not in err and "Traceback" not in err


@pytest.mark.parametrize("trickle", [False, True])
def test_an_upload_slower_than_its_deadline_is_answered_408(trickle):
    """A client that stalls, or trickles a byte at a time, held its connection as long as it liked (256 of them,
    every connection); its body now has upload_timeout seconds to arrive, then a 408 and the inflight bytes back."""
    answers = threading.Event()
    answers.set()
    batcher = DynamicBatcher(_fake_predict(answers), 1, 0, 4)
    running = Running(create_app(batcher, {}, 32, (2, 2), Limits(upload_timeout=0.6)))
    port = int(running.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.settimeout(10)
            slow.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b"
                         b"\r\nContent-Length: 10000\r\n\r\n--b\r\n")
            start = time.monotonic()
            for _ in range(6 if trickle else 0):  # a byte every 0.2 s: past the deadline, never stalled
                time.sleep(0.2)
                slow.sendall(b"x")
            answer = b""
            while b"}" not in answer:  # the headers, then the JSON body (two packets, maybe)
                chunk = slow.recv(4096)
                if not chunk:
                    break
                answer += chunk
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.6 s" in answer
        assert time.monotonic() - start < 5
        assert httpx.get(f"{running.url}/v1/model").json()["limits"]["upload_timeout"] == 0.6
        assert _post(running.url, [("a.png", _png_bytes())]).status_code == 200  # the server serves on
    finally:
        running.stop()


def test_token_is_enforced_on_the_api(monkeypatch):
    batcher = DynamicBatcher(_fake_predict(threading.Event()), 1, 0, 4)
    running = Running(create_app(batcher, {"checkpoint": "fake"}, 32, (2, 2), Limits(), token="s3cret"))
    try:
        url = running.url
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for response in (httpx.get(f"{url}/v1/model", headers=headers),
                             _post(url, [("a.png", _png_bytes())], headers=headers)):
                assert response.status_code == 401 and "Bearer" in response.json()["error"]
                assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200 and 'id="token"' in httpx.get(url).text
    finally:
        running.stop()
    monkeypatch.setenv(serve.TOKEN_ENV, "from-env")
    assert serve._token(serve.ServeJob("x")) == "from-env"
    assert serve._token(serve.ServeJob("x", token="flag")) == "flag"


def test_serve_command_loopback_and_graceful_sigterm(tiny_checkpoint, mixed, capsys):
    from captioner.cli import main
    assert main(["serve", "--checkpoint", tiny_checkpoint, "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    folder, _, _ = mixed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--checkpoint", tiny_checkpoint, "--port",
                                "0", "--device", "cpu", "--max-wait-ms", "1500"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving")) and len(lines) < 20:  # "serving ... on URL (...)"
            lines.append(process.stderr.readline())
            if not lines[-1]:
                break
        line = lines[-1]
        assert "loopback only" in line, "".join(lines)
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_post, url, _upload(folder, ["photo.jpg"]))
            time.sleep(0.5)  # the request waits in the batcher (max wait 1.5 s) when SIGTERM arrives
            process.send_signal(signal.SIGTERM)
            assert in_flight.result().status_code == 200
        assert process.wait(30) == 0
        assert json.loads(process.stdout.read().strip().splitlines()[-1])["stats"]["images"] >= 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.skipif(not os.path.exists(BINARY), reason=f"{BINARY} not found: install Debian's chromium package "
                    "(`apt-get install chromium`, as .ci/run does) to test the page")
def test_page_in_headless_chromium(server, mixed, tmp_path):
    folder, _, _ = mixed
    page = httpx.get(server.url).text
    assert not re.search(r"""(src|href)=["']?(https?:)?//|@import|url\((https?:)?//""", page)  # offline
    expected = _post(server.url, _upload(folder, ["photo.jpg"])).json()["results"][0]
    with Chromium() as browser:
        browser.open(f"{server.url}/", width=390, height=844, mobile=True)  # a phone's width
        browser.set_files("#pick", [folder / "photo.jpg", folder / "text.jpg"])
        shown = browser.wait_for("document.querySelectorAll('.entry.pending').length === 0 && "
                                 "document.querySelectorAll('#results .entry').length === 2 && "
                                 "JSON.stringify({caption: document.querySelector('figure.entry .caption').textContent,"
                                 " panels: Array.from(document.querySelectorAll('figure.entry .word img'), i => i.alt),"
                                 " error: document.querySelector('.entry.error').textContent,"
                                 " overflow: document.documentElement.scrollWidth - innerWidth})")
        browser.screenshot(str(tmp_path / "page.png"))
    shown = json.loads(shown)
    assert shown["caption"] == expected["caption"]
    assert shown["panels"] == [f"attention for {w['word']}" for w in expected["words"]]
    assert "text.jpg" in shown["error"] and "not an image" in shown["error"]
    assert shown["overflow"] <= 0  # nothing wider than the phone's screen
    assert Image.open(tmp_path / "page.png").size[0] == 390
