"""`captioner bench` runs on CPU and writes every number; batched beam search equals one image at a time.

Benchmarks print numbers: nothing here asserts on a speed.
"""
import json
import math
import os

import pytest
import torch

from captioner.engine.infer import predict
from captioner.engine.train.step import TrainingStep
from captioner.jobs import bench
from captioner.model.decoding import SearchOptions, beam_search
from captioner.cli import main
from captioner.config import EncoderConfig, ModelConfig
from captioner.engine.runtime.compute import cpu_capability
from captioner.data.synthetic import write_jpegs
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel


@pytest.mark.slow
def test_bench_smoke_writes_json_with_every_key_timing_the_products_own_step_and_caption(tmp_path, capsys,
                                                                                         monkeypatch):
    calls = {"step": 0, "caption": 0}
    real_step, real_caption = TrainingStep.__call__, predict.caption_batch

    def step(self, *args, **kwargs):  # spies: bench must run training's step and captioning's decode
        calls["step"] += 1
        return real_step(self, *args, **kwargs)

    def caption_batch(*args, **kwargs):
        calls["caption"] += 1
        return real_caption(*args, **kwargs)

    monkeypatch.setattr(TrainingStep, "__call__", step)
    monkeypatch.setattr(predict, "caption_batch", caption_batch)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine, two OpenMP threads can be 10x slower on these tiny ops.
    assert main(["bench", "--smoke", "--device", "cpu", "--threads", "1", "--json", str(out), "max_len=4"]) == 0
    assert torch.get_num_threads() == threads  # restored
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    for key in (*bench.KEYS, "beam_batched_speedup", "train_cached_speedup"):
        value = results[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
        assert key in table
    assert 0 < results["scst_reward_fraction"] < 1 and "scst_reward_fraction" in table
    assert results["settings"]["arch"] == "resnet18" and results["settings"]["max_len"] == 4
    # bf16 and channels_last resolve `auto` for this CPU: on with native bf16 units, off otherwise.
    native = cpu_capability().native_bf16
    assert results["settings"]["device_type"] == "cpu" and results["settings"]["bf16_active"] is native
    assert results["settings"]["channels_last_active"] is native and "native_bf16" in results["cpu_capability"]
    assert ("AVX512-BF16" in table) and ("bf16 on" if native else "bf16 off") in table
    assert results["versions"]["torch"] == torch.__version__ and "CPU, 1 threads" in results["device"]
    # smoke: 2 cached + 1 image + 1 SCST training steps, each after a warm-up step; greedy and beam 3 over 4
    # images in batches of 4, each after a warm-up batch
    assert calls == {"step": (2 + 1) + (1 + 1) + (1 + 1), "caption": 2 * (1 + 1)}
    # shared as it is: no path of this machine (the temporary JPEGs, caches, model folders) in the results
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value]
    assert not [v for v in strings(results) if isinstance(v, str) and os.path.isabs(v)]


def test_bench_rejects_unknown_sizes(capsys):
    assert main(["bench", "--smoke", "--device", "cpu", "trian_batch=4"]) == 2
    assert "field among: arch" in capsys.readouterr().err
    with pytest.raises(CaptionerError, match="expects int"):
        bench.BenchJob("cpu", "smoke", overrides=["train_batch=big"])


def test_synthetic_jpegs_are_photo_sized(tmp_path):
    paths = write_jpegs(tmp_path, 5, 640, 480, distinct=2)
    sizes = [len(open(p, "rb").read()) for p in paths]
    assert len(paths) == 5 and sizes[0] == sizes[2] != sizes[1]
    assert all(20_000 < s < 400_000 for s in sizes)  # a real 640x480 photo at q90 is 50-200 kB


def test_batched_beam_at_batch_32_equals_per_image_beam():
    """The bench's per-image vs batched comparison decodes the very same captions."""
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(48, 48, 64, dropout=0.5), 300)
    raw = torch.randn(32, 512, 2, 2) * 50
    options = SearchOptions(beam_size=3, max_len=12)
    batched = beam_search(model, raw, options)
    for i in range(32):
        single = beam_search(model, raw[i:i + 1], options)
        n = int(single.lengths[0])
        assert int(batched.lengths[i]) == n
        assert torch.equal(batched.tokens[i, :n], single.tokens[0, :n])
        assert torch.allclose(batched.scores[i], single.scores[0], atol=1e-4)


def test_bf16_autocast_path_runs_decoding_and_training():
    """The CUDA bf16 path, run under CPU autocast: no dtype clashes in beam search, the loss or backward."""
    from captioner.model.decoder import caption_loss
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 32), 50)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    captions = torch.randint(4, 50, (4, 7))
    captions[:, 0] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.encode(images)
        out = beam_search(model, raw, SearchOptions(beam_size=3, max_len=5))
        logits, alphas = model.train()(raw, captions)
        loss, _ = caption_loss(logits, alphas, captions, torch.tensor([7, 6, 5, 4]), 1.0)
    loss.backward()
    assert out.tokens.shape[0] == 4 and torch.isfinite(out.scores).all() and torch.isfinite(loss)
    assert model.projector[0].weight.grad is not None and model.projector[0].weight.dtype == torch.float32


def test_serve_load_test_client_survives_a_keep_alive_the_server_dropped():
    """scripts/bench_serve.py: a client that waited longer than the server keeps idle connections (uvicorn: 5 s)
    reconnects instead of counting a broken pipe as a failed request (slow models showed errors that were not)."""
    import importlib.util
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from helpers import ROOT
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "scripts" / "bench_serve.py")
    bench_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_serve)

    class DropsEveryConnection(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive as far as the client knows; the socket closes after each answer

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"results": [{"caption": "a"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), DropsEveryConnection)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = bench_serve.Client("127.0.0.1", server.server_address[1])
        body = bench_serve.multipart("a.jpg", b"x" * 200_000)
        assert [client.post(body)[0] for _ in range(5)] == [200] * 5
    finally:
        server.shutdown()
        server.server_close()
