"""Load test of `captioner serve`: start it on loopback, send N requests from C concurrent clients, print JSON.

    python scripts/bench_serve.py --checkpoint demo/run/best.pt --requests 200 --concurrency 16
    python scripts/bench_serve.py --checkpoint best.pt --images photos/ --device cuda --max-batch 64
    python scripts/bench_serve.py --checkpoint model-int8/ --runtimes torch,onnxruntime --threads 1 --rounds 3

Runs the server twice, with --max-batch as given and with --max-batch 1, and prints one JSON object:
{"batched": {...}, "unbatched": {...}, "speedup": images/s batched over unbatched}, each run with images/s,
p50/p95/p99 latency in ms, errors, and the server's batch statistics. Each request carries one image (the
--images files in turn, or generated JPEGs); a run stops after --requests requests or --seconds, whichever
comes first. The server is a subprocess (`python -m captioner serve`), stopped with SIGTERM.

--runtimes torch,onnxruntime compares runtimes instead, on one model folder written by `captioner export --format
onnx` (PyTorch runs its model.safetensors, ONNX Runtime its graphs, int8 ones after --quantize int8): the batched
server once per runtime and round, the runtimes taking turns, and prints each run and, per runtime, the median
over rounds of its images/s over the first runtime's in the same round ("speedup"). PyTorch runs in float32
(compute.bf16=false, also on CPUs where auto would use bf16). --threads pins the server's threads
(OMP_NUM_THREADS; both runtimes follow it).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "captioner-bench-boundary"
FLOAT32 = ["compute.bf16=false", "compute.channels_last=false"]  # --runtimes: PyTorch runs in float32


def generated_images(count: int = 8) -> list[tuple[str, bytes]]:
    """Photo-sized JPEGs of coloured shapes (what the demo model knows), decoded like any upload."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        img = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(2):
            x, y, r = int(rng.integers(80, 560)), int(rng.integers(80, 400)), int(rng.integers(30, 80))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 150, 3)))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=85)
        images.append((f"generated{i}.jpg", buffer.getvalue()))
    return images


def folder_images(folder: str, limit: int = 64) -> list[tuple[str, bytes]]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        sys.exit(f"bench_serve: no .jpg/.png/.webp images in {folder}")
    return [(p.name, p.read_bytes()) for p in files[:limit]]


def multipart(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


# What a keep-alive connection the server closed while it sat idle gives on its next request.
STALE = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


class Client(threading.local):
    """One keep-alive connection per client thread."""

    def __init__(self, host: str, port: int):
        self.connection = http.client.HTTPConnection(host, port, timeout=120)

    def post(self, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        for attempt in range(2):
            try:
                self.connection.request("POST", "/v1/caption", body, headers)
                response = self.connection.getresponse()
                return response.status, response.read()
            except STALE:
                # uvicorn closes connections idle for 5 s: a client that waited that long for the others
                # (a slow model) finds its connection gone. Not the server's failure: once more, on a new one.
                self.connection.close()
                if attempt:
                    raise
            except (OSError, http.client.HTTPException):
                self.connection.close()  # reconnects on the next request
                raise


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "captioner", "serve", "--checkpoint", args.checkpoint, "--port", "0",
           "--device", args.device, "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue", str(max(256, 4 * args.concurrency))]
    if args.beam:
        cmd += ["--beam", str(args.beam)]
    if getattr(args, "runtime", None):
        cmd += ["--runtime", args.runtime]
    if getattr(args, "runtime", None) == "torch":
        cmd += FLOAT32  # the baseline ONNX Runtime is measured against, even where auto would pick bf16
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # up to "serving ... on http://127.0.0.1:PORT ..."
        lines.append(line)
        if match := re.search(r"on (http://127\.0\.0\.1:\d+)", line):
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep draining
            return process, match.group(1)
    process.wait()
    sys.exit(f"bench_serve: the server did not start:\n{''.join(lines[-10:])}")


def run(args, images: list[tuple[str, bytes]], max_batch: int) -> dict:
    process, url = start_server(args, max_batch)
    host, port = url.removeprefix("http://").split(":")
    client = Client(host, int(port))
    bodies = [multipart(name, data) for name, data in images]
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda i: client.post(bodies[i % len(bodies)]), range(args.concurrency)))  # warm up
            latencies, errors, lock = [], [], threading.Lock()
            deadline = time.perf_counter() + args.seconds

            def one(i: int) -> None:
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    status, body = client.post(bodies[i % len(bodies)])
                    ok = status == 200 and "caption" in json.loads(body)["results"][0]
                except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the test
                    status, body, ok = None, str(e).encode(), False
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - start if ok else (status, body[:200]))

            start = time.perf_counter()
            list(pool.map(one, range(args.requests)))
            seconds = time.perf_counter() - start
        stats = json.loads(_get(host, int(port), "/v1/model"))["stats"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    ms = np.array(latencies) * 1000
    return {"max_batch": max_batch, "requests": len(latencies) + len(errors), "errors": len(errors),
            "first_errors": [f"{s}: {b.decode(errors='replace')}" for s, b in errors[:3]],
            "seconds": round(seconds, 2), "images_per_second": round(len(latencies) / seconds, 2),
            "latency_ms": {f"p{q}": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)},
            "server_batches": stats["batches"], "server_mean_batch": stats["mean_batch"]}


def _get(host: str, port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", path)
    return connection.getresponse().read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", default=None, help="folder of images to send (default: generated JPEGs)")
    parser.add_argument("--requests", type=int, default=200, help="requests per run (default: 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--seconds", type=float, default=120, help="stop sending after this long (default: 120)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the checkpoint's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runtimes", default=None,
                        help="compare these runtimes (e.g. torch,onnxruntime) on one exported model folder")
    parser.add_argument("--rounds", type=int, default=3, help="with --runtimes: rounds of one run each (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="the server's CPU threads (OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.seconds <= 0:
        parser.error("--requests, --concurrency and --seconds must be positive")
    images = folder_images(args.images) if args.images else generated_images()
    if args.runtimes:
        return compare_runtimes(args, images, [r.strip() for r in args.runtimes.split(",") if r.strip()])
    batched = run(args, images, args.max_batch)
    unbatched = run(args, images, 1)
    speedup = (batched["images_per_second"] / unbatched["images_per_second"]
               if unbatched["images_per_second"] else None)
    print(json.dumps({"concurrency": args.concurrency, "images": len(images), "batched": batched,
                      "unbatched": unbatched, "speedup": round(speedup, 2) if speedup else None}, indent=1))
    return 1 if batched["errors"] or unbatched["errors"] else 0


def compare_runtimes(args, images: list[tuple[str, bytes]], runtimes: list[str]) -> int:
    """The batched server per runtime and round, the runtimes taking turns; JSON with every run and the median
    speedup of each runtime over the first."""
    runs = {r: [] for r in runtimes}
    for round_ in range(args.rounds):
        for runtime in runtimes[round_ % len(runtimes):] + runtimes[: round_ % len(runtimes)]:
            args.runtime = runtime
            runs[runtime].append(run(args, images, args.max_batch))
            print(f"round {round_ + 1} {runtime}: {runs[runtime][-1]['images_per_second']} images/s", file=sys.stderr)
    first = runtimes[0]
    rates = {r: [x["images_per_second"] for x in runs[r]] for r in runtimes}
    speedup = {r: round(float(np.median([a / b for a, b in zip(rates[r], rates[first])])), 2) for r in runtimes}
    print(json.dumps({"concurrency": args.concurrency, "images": len(images), "threads": args.threads,
                      "images_per_second": {r: rates[r] for r in runtimes}, "speedup": speedup, "runs": runs},
                     indent=1))
    return 1 if any(x["errors"] for r in runtimes for x in runs[r]) else 0


if __name__ == "__main__":
    sys.exit(main())
