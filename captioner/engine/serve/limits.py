"""What `captioner serve` accepts from a client: plain data, importable without the [serve] extra."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_upload_bytes: int = 32 * 2**20  # one request's whole body
    max_images: int = 32  # image parts per request
    max_pixels: int = 40_000_000  # per image, checked before decoding (decompression bombs)
    timeout: float = 60.0  # seconds a request may wait for its captions
    # seconds a request's body may take to arrive: a client trickling bytes would hold its connection (and, 256 of
    # them, every connection uvicorn takes) as long as it liked
    upload_timeout: float = 60.0
    max_inflight_bytes: int = 512 * 2**20  # upload bytes held by all requests together
    retry_after: int = 1  # seconds, in 503 answers
    # A request's own generation fields (beyond the server's settings): wider searches and longer captions hold
    # up every request batched with them.
    max_beam_size: int = 16  # beam_size and num_return_sequences
    max_len: int = 100  # words
