"""ONNX export and the ONNX Runtime backend: the exported graphs compute what the PyTorch model computes, and
the one set of decoding loops runs over either backend."""
from __future__ import annotations

import sys

import pytest
import torch

from captioner.config import EncoderConfig, ModelConfig
from captioner.errors import CaptionerError
from captioner.model.caption_model import CaptionModel
from captioner.model.decoding import beam_search, decode, greedy_decode
from captioner.model.encoder import HookedEncoder
from captioner.model.truncated import TruncatedEncoder

pytest.importorskip("onnxruntime")

from captioner.engine.infer.onnx_export import GRAPHS, export_graphs, quantize_graphs  # noqa: E402
from captioner.engine.infer.onnx_runtime import EncoderSpec, OnnxBackend  # noqa: E402


def _backend(folder, model, precision="float32"):
    return OnnxBackend({name: folder / f"{name}.onnx" for name in GRAPHS}, EncoderSpec.of(model.encoder),
                       model.decoder.vocab_size, precision=precision)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, ORT backend) of a random ResNet-18 captioner at 64 px, exported once for the module."""
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 48, dropout=0.3), 40)
    folder = tmp_path_factory.mktemp("onnx")
    assert export_graphs(model.eval(), folder) == ["encoder.onnx", "decoder_init.onnx", "decoder_step.onnx"]
    return model, _backend(folder, model), folder


def test_truncated_encoder_equals_the_hooked_one_and_stops_at_the_layer():
    enc = HookedEncoder("resnet18", "layer3", image_size=64)
    cut = TruncatedEncoder(enc)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(enc(images), cut(images))
        assert torch.equal(enc(images.float() / 255), cut(images.float() / 255))
    # The graph ends at layer3: nothing of layer4, avgpool or fc is in it.
    assert not any(name.startswith(("layer4", "avgpool", "fc")) for name, _ in cut.trunk.named_modules() if name)
    assert len(enc.backbone.layer3._forward_hooks) == 1  # the hooked encoder keeps its hook


def test_ort_features_and_captions_equal_pytorch(small):
    model, backend, _ = small
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    features = backend.encode(images)
    assert features.shape == raw.shape == (5, 512, 2, 2)
    assert _relative(raw, features) < 1e-4
    for run in (lambda m, r: greedy_decode(m, r, 12), lambda m, r: beam_search(m, r, 3, 12, 0.5)):
        torch_out, ort_out = run(model, raw), run(backend, features)
        assert torch.equal(torch_out.tokens, ort_out.tokens)
        assert torch.allclose(torch_out.scores, ort_out.scores, atol=1e-4)
        assert torch.allclose(torch_out.alphas, ort_out.alphas, atol=1e-5)
    sampled = decode(backend, features, max_len=6, sample=True)  # sampling drives the same sessions
    assert sampled.tokens.shape[0] == 5 and (sampled.lengths >= 1).all()
    model.train()
    try:  # through the step interface, PyTorch decoding still runs in eval mode and gives the mode back
        assert torch.equal(greedy_decode(model, raw, 12).tokens, greedy_decode(backend, features, 12).tokens)
        assert model.training
    finally:
        model.eval()


def test_dynamic_batch_and_one_image_alone_equals_in_a_batch(small):
    model, backend, _ = small
    images = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    batched = beam_search(backend, backend.encode(images), 3, 10)
    alone = beam_search(backend, backend.encode(images[4:5]), 3, 10)
    n = int(alone.lengths[0])
    assert torch.equal(batched.tokens[4, :n], alone.tokens[0, :n])


def test_missing_extra_is_one_line(monkeypatch, small):
    from captioner.engine.infer import onnx_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    model, _, folder = small
    for attempt in (lambda: onnx_export.export_graphs(model, folder / "again"),
                    lambda: _backend(folder, model)):
        with pytest.raises(CaptionerError) as e:
            attempt()
        assert 'pip install "captioner[onnx]"' in str(e.value) and "\n" not in str(e.value)


def test_corrupt_graph_is_one_line(small, tmp_path):
    model, _, folder = small
    for name in GRAPHS:
        (tmp_path / f"{name}.onnx").write_bytes((folder / f"{name}.onnx").read_bytes())
    (tmp_path / "decoder_step.onnx").write_bytes(b"not a graph")
    with pytest.raises(CaptionerError, match="decoder_step.onnx: onnxruntime cannot load it"):
        _backend(tmp_path, model)
    (tmp_path / "decoder_step.onnx").unlink()
    with pytest.raises(CaptionerError, match="missing: decoder_step.onnx"):
        _backend(tmp_path, model)


@pytest.mark.slow
def test_int8_graphs_are_quantized_and_close(small, tmp_path):
    model, _, folder = small
    calibration = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    quantize_graphs(folder, tmp_path, calibration)
    import onnx
    ops = {name: {n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node} for name in GRAPHS}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops["encoder"]  # QDQ around the convolutions
    assert "MatMulInteger" in ops["decoder_step"] and "MatMulInteger" in ops["decoder_init"]
    int8 = _backend(tmp_path, model, "int8")
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    assert _relative(raw, int8.encode(images)) < 0.2  # int8 of random weights: close, not equal
    out = beam_search(int8, int8.encode(images), 3, 8)
    assert torch.isfinite(out.scores).all() and (out.lengths >= 1).all()


@pytest.mark.slow
def test_resnet152_shaped_encoder_round_trip(tmp_path):
    """The product's default encoder (ResNet-152 layer4, random weights) exports and equals PyTorch, at 96 px
    to keep it affordable (a 3x3 grid)."""
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet152", image_size=96), ModelConfig(32, 32, 48), 30).eval()
    export_graphs(model, tmp_path)
    backend = _backend(tmp_path, model)
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.encode(images)
    features = backend.encode(images)
    assert features.shape == (2, 2048, 3, 3) and _relative(raw, features) < 1e-4
    assert torch.equal(greedy_decode(model, raw, 8).tokens, greedy_decode(backend, features, 8).tokens)


@pytest.mark.slow
def test_bench_runtimes_smoke_writes_the_three_rows(tmp_path, capsys):
    import json

    from captioner.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--runtimes", "--device", "cpu", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["runtimes"]["resnet18"]
    table = capsys.readouterr().out
    for name in ("torch_fp32", "ort_fp32", "ort_int8"):
        for key in ("caption_images_per_s", "encoder_images_per_s", "caption_speedup", "encoder_speedup"):
            assert rows[name][key] > 0
        assert name in table
    assert rows["torch_fp32"]["caption_speedup"] == 1.0
