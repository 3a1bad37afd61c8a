"""Serve a checkpoint over HTTP: a JSON API and a page to drop images on, batched across requests.

    captioner serve --checkpoint demo/run/best.pt                     # http://127.0.0.1:8000 (loopback only)
    curl -F image=@photo.jpg http://127.0.0.1:8000/v1/caption         # {"results": [{"caption", ...}]}
    curl -F image=@photo.jpg -F beam_size=5 -F num_return_sequences=3 http://127.0.0.1:8000/v1/caption
    curl http://127.0.0.1:8000/v1/model                               # checkpoint, decoding, limits, batch stats
    CAPTIONER_TOKEN=secret captioner serve --checkpoint best.pt --host 0.0.0.0 --allow-remote
    captioner serve --checkpoint model/ compute.bf16=false           # float32 on a CPU where auto means bf16
    captioner serve --checkpoint model/ --beam 5 --print-config      # the config it would serve with; nothing started

Images are decoded by the same function and error rules as `captioner caption` and captioned by the same
decode path (engine/infer/predict.py caption_batch), so a served caption equals the command's. Requests that
arrive together are captioned in one batch (up to --max-batch, waiting at most --max-wait-ms); SIGTERM or
Ctrl-C stops accepting, lets the requests in flight finish, then exits.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import signal
import socket
from dataclasses import astuple, dataclass, field
from pathlib import Path

import torch

from captioner.config import check_checkpoint_overrides, require_min
from captioner.engine.serve.batcher import DynamicBatcher
from captioner.engine.runtime.signals import STOP_SIGNALS
from captioner.engine.serve.limits import Limits
from captioner.engine.infer.predict import DecodeSettings
from captioner.engine.infer.predictor import Predictor, ort_session_options
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

TOKEN_ENV = "CAPTIONER_TOKEN"


@dataclass
class ServeJob:
    """`captioner serve`'s options, checked when built."""
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
    max_upload_mb: float = 32.0  # one request's whole body
    max_images: int = 32  # image parts per request
    max_pixels: int = 40_000_000  # per image, checked before decoding (decompression bombs)
    timeout: float = 60.0  # seconds a request may wait for its captions
    upload_timeout: float = 60.0  # seconds a request's body may take to arrive (408 after)
    runtime: str = "torch"  # torch | onnxruntime (a model folder's ONNX graphs)
    providers: list[str] | None = None  # onnxruntime: execution providers, best first (None: from the device)
    ort_threads: int | None = None  # onnxruntime: intra-op threads (None: torch's count)
    ort_optimization: str | None = None  # onnxruntime: graph optimization level (None: all)
    overrides: list[str] = field(default_factory=list)  # section.key=value on the checkpoint config: compute.bf16=false

    def __post_init__(self):
        require_min(("--port", self.port, 0), ("--max-batch", self.max_batch, 1),
                    ("--max-wait-ms", self.max_wait_ms, 0),
                    ("--queue", self.queue, 1), ("--beam", self.beam_size, 1),
                    ("--decode-threads", self.decode_threads, 1), ("--max-images", self.max_images, 1),
                    ("--max-upload-mb", self.max_upload_mb, 1 / 2**20), ("--max-pixels", self.max_pixels, 1),
                    ("--timeout", self.timeout, 0.001),
                    ("--upload-timeout", self.upload_timeout, 0.001), ("--ort-threads", self.ort_threads, 1))
        check_checkpoint_overrides(list(self.overrides))
        if self.port > 65535:
            raise CaptionerError(f"--port must be <= 65535, got {self.port}")
        if self.queue < self.max_batch:
            raise CaptionerError(f"--queue {self.queue} must be at least --max-batch {self.max_batch}")
        if not is_loopback(self.host) and not self.allow_remote:
            raise CaptionerError(f"--host {self.host} lets other machines connect; add --allow-remote to confirm "
                                 f"(and consider --token), or keep the default --host 127.0.0.1")

    @property
    def limits(self) -> Limits:
        return Limits(max_upload_bytes=int(self.max_upload_mb * 2**20), max_images=self.max_images,
                      max_pixels=self.max_pixels, timeout=self.timeout, upload_timeout=self.upload_timeout)


class ServedModel:
    """The model behind the server: a Predictor loaded once, then predict(batch) from the batcher's thread."""

    def __init__(self, checkpoint: str, device: str = "auto", beam_size: int | None = None, runtime: str = "torch",
                 overrides: list[str] = (), providers: list[str] | None = None,
                 session_options: dict | None = None):
        # as `captioner caption` does
        self.predictor = Predictor.load(checkpoint, device, beam_size=beam_size, runtime=runtime,
                                        overrides=overrides, providers=providers, session_options=session_options)
        p, enc = self.predictor, self.predictor.encoder
        self.info = {"checkpoint": Path(checkpoint).name, "arch": enc.arch, "layer": enc.layer,
                     "grid": list(enc.grid), "image_size": enc.image_size, "vocab_size": len(p.vocab),
                     "preprocess": {"mean": list(enc.preprocess.mean), "std": list(enc.preprocess.std),
                                    "interpolation": enc.interpolation},
                     "decoding": {k: getattr(p.settings, k) for k in ("beam_size", "max_len", "length_penalty",
                                                                       "sample", "temperature", "block_ngram",
                                                                       "suppress_unk", "groups", "diversity",
                                                                       "top_k", "top_p", "num_return_sequences")},
                     "device": str(p.device), "runtime": p.runtime, "description": f"{p.description()}."}

    def request_settings(self, fields: dict[str, str], limits: Limits) -> DecodeSettings:
        """A request's generation fields (text, by Captioner.caption's keyword names) -> its decode settings,
        checked by the config's rules, then by limits where they go beyond the server's own settings."""
        settings = self.predictor.settings_for(fields, as_text=True)
        own = self.predictor.settings
        for name, limit in (("beam_size", limits.max_beam_size), ("num_return_sequences", limits.max_beam_size),
                            ("max_len", limits.max_len)):
            value = getattr(settings, name)
            if value > max(limit, getattr(own, name)):
                raise CaptionerError(f"{name} {value} is above this server's limit of {limit}")
        return settings

    def predict(self, items: list[tuple]) -> list[dict]:
        """[(image (3, S, S) uint8, (width, height)[, DecodeSettings of its request])] -> [{"caption", "score",
        "words", "alphas" (L, N), "sequences", "batch_size"}], in order, decoded by the decode path `captioner
        caption` uses: in this one batch, or one batch per distinct request settings (a batch decodes one way)."""
        groups: dict = {}  # settings -> the positions of its items
        for i, item in enumerate(items):
            settings = item[2] if len(item) > 2 else None
            groups.setdefault(None if settings is None else astuple(settings), (settings, []))[1].append(i)
        results: list = [None] * len(items)
        for settings, positions in groups.values():
            # B x (3, S, S) -> (B, 3, S, S)
            images = torch.stack([items[i][0] for i in positions]).to(self.predictor.device)
            captioned = self.predictor.caption_batch(images, attention=True, settings=settings)
            for i, c in zip(positions, captioned):  # scores rounded as `captioner caption` writes them
                results[i] = {"caption": c.caption, "score": round(c.score, 4), "words": c.words,
                              "alphas": c.alphas.numpy(), "batch_size": len(positions),
                              "sequences": [(text, round(score, 4)) for text, score in c.sequences]}
        return results


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(opts: ServeJob):
    """(app, served): the model loaded and warmed up, the batcher started, the FastAPI app around them."""
    from captioner.engine.serve.webapp import create_app  # FastAPI is an optional extra: imported on use
    served = ServedModel(opts.checkpoint, opts.device, opts.beam_size, opts.runtime, opts.overrides, opts.providers,
                         ort_session_options(opts.ort_threads, opts.ort_optimization))
    size = served.predictor.image_size
    served.predict([(torch.zeros(3, size, size, dtype=torch.uint8), (size, size))])  # warm-up before serving
    batcher = DynamicBatcher(served.predict, opts.max_batch, opts.max_wait_ms / 1000, opts.queue)
    token = _token(opts)
    info = {**served.info, "token_required": token is not None}
    encoder = served.predictor.encoder
    return create_app(batcher, info, size, tuple(encoder.grid), opts.limits, token, opts.decode_threads,
                      encoder.interpolation, lambda fields: served.request_settings(fields, opts.limits)), served


def main(opts: ServeJob) -> dict:
    """Serve until SIGTERM/SIGINT; returns {"url", "stats"} once stopped."""
    try:
        import uvicorn
    except ImportError:
        raise CaptionerError('serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    app, _ = build(opts)
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


def _token(opts: ServeJob) -> str | None:
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
        if port and port < 1024 and e.errno == errno.EACCES:  # a privileged port; port + 1 would be one too
            raise CaptionerError(f"cannot listen on {host}:{port}: ports below 1024 need root; try --port 8000 "
                                 f"or --port 0 for any free port") from None
        raise CaptionerError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? "
                             f"try --port {port + 1} or --port 0 for any free port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
