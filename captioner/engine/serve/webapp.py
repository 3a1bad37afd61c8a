"""The HTTP API and page of `captioner serve`: FastAPI routes over a DynamicBatcher that owns the model.

    app = create_app(batcher, model_info, image_size=224, grid=(7, 7), limits=Limits(), token=None,
                     interpolation="bicubic")    # the model's input size and resize filter
    uvicorn.run(app, host="127.0.0.1", port=8000)

    curl -F image=@a.jpg -F image=@b.png http://127.0.0.1:8000/v1/caption
    -> {"results": [{"name", "caption", "score", "words": [{"word", "attention": [[...H x W...]]}],
                     "width", "height", "batch_size"}, {"name", "error"}]}
    curl -F image=@a.jpg -F beam_size=5 -F num_return_sequences=3 http://127.0.0.1:8000/v1/caption
    -> ... "sequences": [{"caption", "score"}, ...] best first (with num_return_sequences > 1)

Text fields beside the images choose how this request's captions are generated, by the names of the Python API
(Captioner.caption's keywords: beam_size, max_len, sample, top_k, top_p, num_return_sequences, ...), checked by
the config's rules and the server's limits (a 400 naming the field); requests with other settings are captioned
in batches of their own.

Every client mistake is a 4xx JSON {"error": "..."}: no image field, a text field where a file belongs
(paths and URLs are never accepted: nothing is opened or fetched for a client), too many images, too many
bytes (413 before the body is read when Content-Length says so), and files that are not images, which are
refused by the same decoder and messages as `captioner caption` (a request whose images all fail is a 422).
Overload is a 503 with Retry-After (queue full, too many upload bytes in flight), a slow model a 504; the
event loop never waits on the model or on image decoding (a thread pool decodes).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from captioner.data.images import read_image_bytes
from captioner.engine.serve.batcher import DynamicBatcher, QueueFull
from captioner.engine.outputs.gallery import entry_html, error_html
from captioner.engine.serve.limits import Limits
from captioner.engine.serve.webpage import page
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")


class Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def create_app(batcher: DynamicBatcher, model_info: dict, image_size: int, grid: tuple[int, int],
               limits: Limits, token: str | None = None, decode_threads: int = 2,
               interpolation: str = "bicubic", generation: Callable[[dict], object] | None = None) -> FastAPI:
    """generation: a request's text fields ({name: text}) -> the decode settings its items carry to the batcher
    (item = (image, size, settings)); raises CaptionerError for a bad one. None: fields are refused."""
    decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="captioner-decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # after uvicorn's graceful stop: in-flight requests got their captions
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="captioner", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    inflight = {"bytes": 0}
    app.state.batcher = batcher

    @app.exception_handler(Refusal)
    async def refused(request, e: Refusal):
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # 404, 405, ...: JSON like every other answer
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse({"error": f"invalid request: {e.errors()[:3]}"}, 422)

    def check_token(request: Request) -> None:
        if token is None:
            return
        sent = request.headers.get("authorization", "")
        if not (sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].strip().encode(), token.encode())):
            raise Refusal(401, "this server needs Authorization: Bearer <token> (the --token it was started with)",
                          {"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page(model_info, needs_token=token is not None))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "queued": batcher.queued}

    @app.get("/v1/model")
    def model(request: Request):
        check_token(request)
        return {**model_info, "limits": asdict(limits), "max_batch": batcher.max_batch,
                "max_wait_ms": round(batcher.max_wait * 1000, 3), "queue_capacity": batcher.capacity,
                "stats": batcher.stats()}

    @app.post("/v1/caption")
    async def caption(request: Request, html: bool = False):
        check_token(request)
        loop = asyncio.get_running_loop()
        body = await _read_body(request, limits, inflight)
        try:
            files, fields = await _image_parts(request, body, limits)
            settings = _settings(generation, fields)
            decoded = await asyncio.gather(*[loop.run_in_executor(decoders, _decode, data, name, image_size,
                                                                  limits.max_pixels, interpolation)
                                             for name, data in files])
        finally:
            inflight["bytes"] -= len(body)
        good = [d for d in decoded if "error" not in d]
        captions = await _captions(batcher, [(d["image"], d["size"], settings) for d in good], limits)
        for d, c in zip(good, captions):
            d["caption"] = c
        results = await asyncio.gather(*[loop.run_in_executor(decoders, _result, d, grid, html) for d in decoded])
        if not good:
            return JSONResponse({"error": f"no image could be read: {results[0]['error']}", "results": results}, 422)
        return {"results": results}

    return app


async def _read_body(request: Request, limits: Limits, inflight: dict) -> bytes:
    """The whole body, refused with 413 past max_upload_bytes and 503 past the bytes all requests may hold."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise Refusal(415, f"send the images as multipart/form-data file fields named `image` (got "
                           f"{kind or 'no Content-Type'}), e.g. curl -F image=@photo.jpg URL")
    too_big = Refusal(413, f"request body is above the limit of {limits.max_upload_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise too_big  # refused before reading a byte
    chunks, size = [], 0
    stream, loop = request.stream().__aiter__(), asyncio.get_running_loop()
    deadline = loop.time() + limits.upload_timeout
    try:
        while True:
            try:  # each wait bounded by what is left of the deadline: a stalled client sends no chunk to check
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise Refusal(408, f"the request body did not arrive within {limits.upload_timeout:g} s "
                                   f"({size} bytes came); send it again, faster") from None
            size += len(chunk)
            inflight["bytes"] += len(chunk)
            if size > limits.max_upload_bytes:
                raise too_big
            if inflight["bytes"] > limits.max_inflight_bytes:
                raise Refusal(503, "too many uploads in progress; retry shortly",
                              {"Retry-After": str(limits.retry_after)})
            chunks.append(chunk)
    except asyncio.CancelledError:  # a stop's grace period ran out mid-upload: an answer, not uvicorn's traceback
        inflight["bytes"] -= size
        raise Refusal(503, "the server is stopping and this upload did not finish in time; retry shortly",
                      {"Retry-After": str(limits.retry_after)}) from None
    except BaseException:
        inflight["bytes"] -= size
        raise
    return b"".join(chunks)


def _settings(generation, fields: dict):
    """The request's decode settings from its text fields (None: the server's own)."""
    if not fields:
        return None
    if generation is None:
        raise Refusal(400, f"this server takes no generation fields (sent: {', '.join(sorted(fields))})")
    try:
        return generation(fields)
    except CaptionerError as e:
        raise Refusal(400, str(e)) from None


async def _image_parts(request: Request, body: bytes, limits: Limits) -> tuple[list[tuple[str, bytes]], dict]:
    """((file name, bytes) of each `image` part, {name: text} of the other fields): text parts in `image`
    (paths, URLs) are refused, never opened; a file in another field, or a field given twice, is refused."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_images, max_fields=16,
                                                         max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as e:  # Starlette turns the first into the second inside an app
        message = getattr(e, "message", None) or getattr(e, "detail", "")
        if "Too many files" in message:
            raise Refusal(413, f"at most {limits.max_images} images per request ({message})") from None
        if "Too many fields" in message or "maximum size" in message:
            raise Refusal(400, f"oversized form: {message} (at most 16 text fields of 64 KB each)") from None
        raise Refusal(400, f"malformed form: {message}; send the images as multipart/form-data file fields named "
                           f"`image`, e.g. curl -F image=@photo.jpg URL") from None
    try:
        parts = form.getlist("image")
        if not parts:
            raise Refusal(400, f"no `image` field in the form (fields sent: {sorted(form.keys()) or 'none'}); "
                               f"send files as multipart field `image`")
        if any(not isinstance(p, UploadFile) for p in parts):
            raise Refusal(400, "`image` must be a file upload holding the image's bytes; file paths and URLs "
                               "are not accepted")
        fields = {}
        for key in form.keys():
            if key == "image":
                continue
            values = form.getlist(key)
            if len(values) != 1 or not isinstance(values[0], str):
                raise Refusal(400, f"field `{key}` must be one text value, e.g. -F {key}=5 (images go in `image`)")
            fields[key] = values[0]
        return [(_name(p.filename, i), await p.read()) for i, p in enumerate(parts)], fields
    finally:
        await form.close()


def _name(filename: str | None, i: int) -> str:
    """The client's file name, only to label results: never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "".join(ch for ch in name if ch.isprintable())[:200] or f"image{i + 1}"


def _decode(data: bytes, name: str, image_size: int, max_pixels: int, interpolation: str) -> dict:
    try:
        image, size = read_image_bytes(data, name, image_size, max_pixels, interpolation)
    except CaptionerError as e:
        return {"name": name, "error": str(e).removeprefix(f"{name}: ")}
    except Exception as e:  # noqa: BLE001 - whatever an upload does to the decoder, it is that upload's error
        log.warning("%s: unexpected decoding failure: %r", name, e)
        return {"name": name, "error": f"cannot decode image ({type(e).__name__})"}
    return {"name": name, "image": image, "size": size}


async def _captions(batcher: DynamicBatcher, items: list, limits: Limits) -> list:
    if not items:
        return []
    try:
        futures = batcher.submit(items)
    except QueueFull as e:
        raise Refusal(503, f"server busy: {e}; retry shortly", {"Retry-After": str(limits.retry_after)}) from None
    waiting = [asyncio.wrap_future(f) for f in futures]
    try:
        return await asyncio.wait_for(asyncio.gather(*waiting), limits.timeout)
    except asyncio.TimeoutError:
        for f in futures:
            f.cancel()  # not started yet: never computed
        raise Refusal(504, f"no caption within {limits.timeout:g}s; the server is overloaded, retry later",
                      {"Retry-After": str(math.ceil(limits.timeout))}) from None
    except QueueFull as e:  # closed while waiting: shutting down
        raise Refusal(503, f"server stopping: {e}", {"Retry-After": str(limits.retry_after)}) from None
    except Exception as e:  # noqa: BLE001 - a failed batch: the request gets a JSON answer, the server lives on
        log.error("captioning failed: %s", e)
        raise Refusal(503, f"captioning failed on the server ({type(e).__name__}); retry or report it",
                      {"Retry-After": str(limits.retry_after)}) from None


def _result(decoded: dict, grid: tuple[int, int], html: bool) -> dict:
    """One image's JSON: caption, score, words with their (H, W) attention, original size; + gallery HTML."""
    name = decoded["name"]
    if "error" in decoded:
        out = {"name": name, "error": decoded["error"]}
        if html:
            out["html"] = error_html(name, decoded["error"])
        return out
    c, (width, height) = decoded["caption"], decoded["size"]
    alphas = np.asarray(c["alphas"], dtype=np.float64)  # (L, H*W)
    grids = np.round(alphas.reshape(len(alphas), *grid), 4)  # (L, H*W) -> (L, H, W)
    out = {"name": name, "caption": c["caption"], "score": c["score"],
           "words": [{"word": w, "attention": g.tolist()} for w, g in zip(c["words"], grids)],
           "width": width, "height": height, "batch_size": c["batch_size"]}
    if len(c.get("sequences", ())) > 1:  # num_return_sequences: every caption, best first
        out["sequences"] = [{"caption": text, "score": score} for text, score in c["sequences"]]
    if html:
        image = decoded["image"].permute(1, 2, 0).numpy()  # (3, S, S) -> (S, S, 3) uint8
        out["html"] = entry_html(name, image, (width, height), c["words"], alphas, grid, c["score"])
    return out
