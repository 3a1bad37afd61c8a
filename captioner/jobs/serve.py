"""Serve a checkpoint over HTTP: a JSON API and a page to drop images on, batched across requests.

    captioner serve --checkpoint demo/run/best.pt                     # http://127.0.0.1:8000 (loopback only)
    curl -F image=@photo.jpg http://127.0.0.1:8000/v1/caption         # {"results": [{"caption", ...}]}
    curl http://127.0.0.1:8000/v1/model                               # checkpoint, decoding, limits, batch stats
    CAPTIONER_TOKEN=secret captioner serve --checkpoint best.pt --host 0.0.0.0 --allow-remote

Images are decoded by the same function and error rules as `captioner caption` and captioned by the same
decode path (engine/infer/predict.py caption_batch), so a served caption equals the command's. Requests that
arrive together are captioned in one batch (up to --max-batch, waiting at most --max-wait-ms); SIGTERM or
Ctrl-C stops accepting, lets the requests in flight finish, then exits.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from captioner.config import require_min
from captioner.engine.serve.batcher import DynamicBatcher
from captioner.engine.infer.checkpoint import load_model
from captioner.engine.runtime.compute import setup_compute
from captioner.engine.runtime.signals import STOP_SIGNALS
from captioner.engine.runtime.device import resolve_device
from captioner.engine.serve.limits import Limits
from captioner.engine.infer.predict import DecodeSettings, caption_batch
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

TOKEN_ENV = "CAPTIONER_TOKEN"


@dataclass
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"  # loopback: only this machine can connect unless allow_remote
    port: int = 8000
    allow_remote: bool = False
    max_batch: int = 32
    max_wait_ms: float = 10.0
    queue: int = 256  # images waiting for the model; more -> 503 + Retry-After
    beam_size: int | None = None  # None: the checkpoint's decode.beam_size
    device: str = "auto"
    token: str | None = None  # None: $CAPTIONER_TOKEN when set, else no token
    decode_threads: int = 2
    max_connections: int = 256  # open connections uvicorn serves at once; beyond, it answers 503
    limits: Limits = field(default_factory=Limits)


class Captioner:
    """The model behind the server: load_model once, then predict(batch) from the batcher's thread."""

    def __init__(self, checkpoint: str, device: str = "auto", beam_size: int | None = None):
        self.device = resolve_device(device)
        self.model, self.vocab, self.cfg = load_model(checkpoint, self.device)
        compute = setup_compute(self.cfg.compute, self.device)  # as `captioner caption` does
        compute.prepare_encoder(self.model.encoder)
        self.settings = DecodeSettings.of(self.cfg, beam_size, compute=compute)
        self.beam_size = self.settings.beam_size
        self.checkpoint = checkpoint
        enc = self.model.encoder
        decoding = "greedy decoding" if self.beam_size == 1 else f"beam search (beam {self.beam_size})"
        self.info = {"checkpoint": Path(checkpoint).name, "arch": enc.arch, "layer": enc.layer,
                     "grid": list(enc.grid), "image_size": enc.image_size, "vocab_size": len(self.vocab),
                     "decoding": {k: getattr(self.settings, k) for k in ("beam_size", "max_len", "length_penalty",
                                                                          "sample", "temperature")},
                     "device": str(self.device),
                     "description": f"{decoding}, attention over the {enc.grid[0]}x{enc.grid[1]} {enc.layer} "
                                    f"grid of {enc.arch}."}

    def predict(self, items: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[dict]:
        """[(image (3, S, S) uint8, (width, height))] -> [{"caption", "score", "words", "alphas" (L, N),
        "batch_size"}], in order, all decoded in this one batch by the decode path `captioner caption` uses."""
        images = torch.stack([image for image, _ in items]).to(self.device)  # B x (3, S, S) -> (B, 3, S, S)
        captioned = caption_batch(self.model, self.vocab, images, self.settings, attention=True)
        # Scores rounded as `captioner caption` writes them.
        return [{"caption": c.caption, "score": round(c.score, 4), "words": c.words, "alphas": c.alphas.numpy(),
                 "batch_size": len(items)} for c in captioned]


def check_options(opts: ServeOptions) -> None:
    require_min(("--port", opts.port, 0), ("--max-batch", opts.max_batch, 1), ("--max-wait-ms", opts.max_wait_ms, 0),
                ("--queue", opts.queue, 1), ("--beam", opts.beam_size, 1), ("--decode-threads", opts.decode_threads, 1),
                ("--max-images", opts.limits.max_images, 1), ("--max-upload-mb", opts.limits.max_upload_bytes, 1),
                ("--max-pixels", opts.limits.max_pixels, 1), ("--timeout", opts.limits.timeout, 0.001))
    if opts.port > 65535:
        raise CaptionerError(f"--port must be <= 65535, got {opts.port}")
    if opts.queue < opts.max_batch:
        raise CaptionerError(f"--queue {opts.queue} must be at least --max-batch {opts.max_batch}")
    if not is_loopback(opts.host) and not opts.allow_remote:
        raise CaptionerError(f"--host {opts.host} lets other machines connect; add --allow-remote to confirm "
                             f"(and consider --token), or keep the default --host 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(opts: ServeOptions):
    """(app, captioner): the model loaded and warmed up, the batcher started, the FastAPI app around them."""
    from captioner.engine.serve.webapp import create_app  # FastAPI is an optional extra: imported on use
    check_options(opts)
    captioner = Captioner(opts.checkpoint, opts.device, opts.beam_size)
    size = captioner.model.encoder.image_size
    captioner.predict([(torch.zeros(3, size, size, dtype=torch.uint8), (size, size))])  # warm-up before serving
    # Decoding threads run data/images.py's per-decode Pillow settings; starting from the same values
    # makes their save-and-restore harmless when two threads overlap.
    Image.MAX_IMAGE_PIXELS = opts.limits.max_pixels
    batcher = DynamicBatcher(captioner.predict, opts.max_batch, opts.max_wait_ms / 1000, opts.queue)
    token = _token(opts)
    info = {**captioner.info, "token_required": token is not None}
    return create_app(batcher, info, size, tuple(captioner.model.grid), opts.limits, token,
                      opts.decode_threads), captioner


def main(opts: ServeOptions) -> dict:
    """Serve until SIGTERM/SIGINT; returns {"url", "stats"} once stopped."""
    try:
        import uvicorn
    except ImportError:
        raise CaptionerError('serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    app, captioner = build(opts)
    sock = _bind(opts.host, opts.port)
    url = f"http://{_url_host(opts.host)}:{sock.getsockname()[1]}"
    where = ("loopback only: other machines cannot connect (--host 0.0.0.0 --allow-remote to serve them)"
             if is_loopback(opts.host) else "reachable from other machines")
    token = "Authorization: Bearer token required" if _token(opts) else "no token"
    log.info("serving %s on %s (%s; %s); page at %s/ , API at %s/v1/caption", opts.checkpoint, url, where, token,
             url, url)
    config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=opts.max_connections,
                            timeout_graceful_shutdown=math.ceil(opts.limits.timeout) + 5)
    server = uvicorn.Server(config)
    stopped_by = []

    def stop(signum, frame):
        # uvicorn handles the signal while it runs (stop accepting, finish in-flight requests, shut down), then
        # raises it again once it has stopped: that lands here and becomes a normal return with the stats.
        stopped_by.append(signal.Signals(signum).name)
        server.should_exit = True  # a signal before uvicorn took over still stops it

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = app.state.batcher.stats()
    log.info("stopped%s: %d images captioned in %d batches", f" by {stopped_by[0]}" if stopped_by else "",
             stats["images"], stats["batches"])
    return {"url": url, "stopped_by": stopped_by[0] if stopped_by else None, "stats": stats}


def _token(opts: ServeOptions) -> str | None:
    return opts.token or os.environ.get(TOKEN_ENV) or None


def _bind(host: str, port: int) -> socket.socket:
    """Bind here, so a taken port is a one-line error and port 0 picks a free one that we can print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CaptionerError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? "
                             f"try --port {port + 1} or --port 0 for any free port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
