"""Stand-ins for the places pretrained weights come from, so code that downloads is tested without the internet:
a loopback HTTP server, a filled Hugging Face cache, and tiny weight files.

    with LoopbackServer({"resnet18-0123abcd.pth": data}) as server:
        url = server.url("resnet18-0123abcd.pth")          # http://127.0.0.1:PORT/resnet18-0123abcd.pth
        ...
        assert server.downloads == ["/resnet18-0123abcd.pth"]
    fill_hub_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", {"model.safetensors": data})
    with LoopbackServer(*hub_files("timm/test_resnet.r160_in1k", {"model.safetensors": data})) as hub: ...

Import them from here (`from downloads import LoopbackServer`), like helpers.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port, a background thread) serving fixed bytes per path and recording
    every request as "GET /path" or "HEAD /path". `headers` adds response headers per path (a Hub's ETag, ...).
    Paths in `truncate` announce their full Content-Length but send only half the bytes, then close the
    connection: an interrupted download. With `drip` seconds, bodies go out in 1/8ths that far apart: a slow but
    steady download. A path is matched without its query string."""

    def __init__(self, files: dict[str, bytes], truncate: set[str] = frozenset(),
                 headers: dict[str, dict[str, str]] | None = None, drip: float = 0.0):
        self.files, self.truncate, self.headers = dict(files), set(truncate), dict(headers or {})
        self.drip = drip
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                name = self.path.split("?", 1)[0].lstrip("/")
                server.requests.append(f"{self.command} {self.path}")
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for key, value in server.headers.get(name, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    data = data[: len(data) // 2] if name in server.truncate else data
                    step = -(-len(data) // 8) if server.drip else len(data)
                    for start in range(0, len(data), max(step, 1)):
                        if start:
                            time.sleep(server.drip)
                        self.wfile.write(data[start:start + step])
                        self.wfile.flush()
                self.close_connection = True

            def do_GET(self):  # noqa: N802 - http.server's names
                self._answer(body=True)

            def do_HEAD(self):  # noqa: N802
                self._answer(body=False)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def downloads(self) -> list[str]:
        """The paths fetched with GET (a HEAD only asks whether a cached copy is current)."""
        return [r.split(" ", 1)[1] for r in self.requests if r.startswith("GET ")]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte: a stalled proxy or a
    half-dead network. `url` is its address; `connections` counts what it accepted."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def connections(self) -> int:
        return len(self.accepted)

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])  # kept open, never answered
            except OSError:  # closed by __exit__
                return

    def __enter__(self) -> "SilentServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()
        self.thread.join(5)


def closed_port_url(name: str) -> str:
    """A loopback URL where nothing listens: connecting is refused at once, like a machine without a network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def tiny_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of model (built on the meta device is enough), stored small: each float
    tensor is one random row broadcast to its shape (stride 0), which torch.save keeps as that row alone
    (ResNet-50's weights in a few hundred kB). BatchNorm variances are 1, so activations stay finite."""
    generator = torch.Generator().manual_seed(seed)

    def small(name: str, v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return torch.zeros(v.shape, dtype=v.dtype, device="cpu")
        if name.endswith("running_var"):
            return torch.ones(v.shape[-1], device="cpu").expand(v.shape)
        row = torch.randn(v.shape[-1] if v.dim() else 1, generator=generator, device="cpu") * 0.05
        return row.expand(v.shape) if v.dim() else row[0].clone()

    return {k: small(k, v) for k, v in model.state_dict().items()}


def saved_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def hashed_name(stem: str, data: bytes, suffix: str = ".pth") -> str:
    """torch.hub's file name for data: stem-<first 8 hex digits of its sha256><suffix> (resnet18-f37072fd.pth)."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{suffix}"


def fill_hub_cache(cache: str | Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Put files into a Hugging Face cache (HF_HUB_CACHE) as huggingface_hub lays them out, as if downloaded:
    models--ORG--NAME/blobs/<sha256>, snapshots/<commit>/<file> linking to the blob, refs/main naming the
    commit. Returns the snapshot folder; huggingface_hub.try_to_load_from_cache then finds each file."""
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def serve_hub(monkeypatch, endpoint: str) -> None:
    """Point huggingface_hub at endpoint (http://127.0.0.1:PORT), as HF_ENDPOINT does: huggingface_hub reads
    it at import, so its constants are patched, like it."""
    from huggingface_hub import constants

    endpoint = endpoint.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def hub_files(repo_id: str, files: dict[str, bytes], etags: dict[str, str] | None = None,
              commit: str = "0" * 40) -> tuple[dict[str, bytes], set, dict[str, dict[str, str]]]:
    """LoopbackServer arguments that answer like the Hugging Face Hub for repo_id's files at revision main
    (point huggingface_hub.constants' ENDPOINT and HUGGINGFACE_CO_URL_TEMPLATE at the server): the path
    REPO/resolve/main/FILE, the commit header, and the ETag an LFS file has, its sha256 (or etags[file])."""
    etags = etags or {}
    paths = {f"{repo_id}/resolve/main/{name}": data for name, data in files.items()}
    headers = {f"{repo_id}/resolve/main/{name}": {
        "X-Repo-Commit": commit, "ETag": f'"{etags.get(name) or hashlib.sha256(data).hexdigest()}"'}
        for name, data in files.items()}
    return paths, set(), headers


def hub_repo(repo_id: str, files: dict[str, bytes], commit: str = "1" * 40
             ) -> tuple[dict[str, bytes], set, dict[str, dict[str, str]]]:
    """LoopbackServer arguments that answer snapshot_download(repo_id) like the Hugging Face Hub: the revision
    (api/models/REPO/revision/main), the file list (api/models/REPO/tree/COMMIT) and each file at that commit."""
    tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in files.items()]
    info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
    paths = {f"api/models/{repo_id}/revision/main": json.dumps(info).encode(),
             f"api/models/{repo_id}/tree/{commit}": json.dumps(tree).encode()}
    headers = {}
    for name, data in files.items():
        paths[f"{repo_id}/resolve/{commit}/{name}"] = data
        headers[f"{repo_id}/resolve/{commit}/{name}"] = {"X-Repo-Commit": commit,
                                                         "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
    return paths, set(), headers
