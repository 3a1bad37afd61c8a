"""The int8 recipe's steps on small graphs: a convolution kept in float really runs in float (onnxruntime's
WeightBiasQuantization would otherwise quantize it per tensor), the sensitivity ranking measures each node at the
features, and GPTQ rounding lowers the output error it minimizes without changing the graph."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from captioner.engine.infer.quantize.calibrate import _quantize_static, ImageReader, quantize_encoder  # noqa: E402
from captioner.engine.infer.quantize.ranking import feature_losses, rank  # noqa: E402


class Steep(torch.nn.Module):
    """uint8 images -> conv -> ReLU6 -> a depthwise conv whose channels' weights differ 10^4-fold (as BatchNorm
    folding leaves MobileNetV2's first depthwise conv) -> ReLU6 -> 1x1 conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.depthwise.weight.mul_(torch.logspace(-2, 2, 8).view(8, 1, 1, 1))

    def forward(self, images):
        x = torch.clamp(self.stem(images.float() / 255), 0, 6)
        return self.head(torch.clamp(self.depthwise(x), 0, 6))


def _session(path, disabled=()):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled) or None)


@pytest.fixture(scope="module")
def steep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steep")
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    torch.onnx.export(Steep().eval(), (images[:1],), str(folder / "float.onnx"), input_names=["images"],
                      output_names=["features"], dynamic_axes={"images": {0: "n"}}, opset_version=17, dynamo=False)
    convs = [n.name for n in onnx.load(str(folder / "float.onnx")).graph.node if n.op_type == "Conv"]
    return folder, images, convs


def test_a_conv_kept_in_float_behind_an_int8_one_runs_in_float(steep, tmp_path):
    folder, images, convs = steep
    depthwise = convs[1]
    quantize_encoder(folder / "float.onnx", tmp_path / "int8.onnx", images, "MinMax", [depthwise])
    x = {"images": images.numpy()}
    as_run = _session(tmp_path / "int8.onnx").run(None, x)[0]
    asked = _session(tmp_path / "int8.onnx", ["WeightBiasQuantization"]).run(None, x)[0]
    np.testing.assert_allclose(as_run, asked, rtol=1e-5, atol=1e-5)  # what onnxruntime runs is what was asked
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    reader = next(n for n in graph.node if n.name == depthwise)
    dq = next(n for n in graph.node if reader.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear" and any(a.name == "axis" and a.i == 1 for a in dq.attribute)
    # Without the rewrite, onnxruntime (>= ~1.20) quantizes the float node's weights per tensor behind our back.
    _quantize_static(folder / "float.onnx", tmp_path / "plain.onnx", ImageReader(images), "MinMax", [depthwise],
                     {}, {})
    plain = _session(tmp_path / "plain.onnx").run(None, x)[0]
    unoptimized = _session(tmp_path / "plain.onnx", ["WeightBiasQuantization"]).run(None, x)[0]
    np.testing.assert_allclose(unoptimized, asked, rtol=1e-5, atol=1e-5)
    if not np.allclose(plain, unoptimized, rtol=1e-3, atol=1e-3):  # this onnxruntime has the optimizer
        assert np.abs(as_run - unoptimized).max() < np.abs(plain - unoptimized).max()


def test_feature_losses_rank_nodes_by_what_they_cost_the_features(steep, tmp_path):
    folder, images, convs = steep
    quantize_encoder(folder / "float.onnx", tmp_path / "int8.onnx", images, "MinMax", [])
    losses = feature_losses(folder / "float.onnx", tmp_path / "int8.onnx", images[:4], convs)
    assert set(losses) == set(convs) and all(v >= 0 for v in losses.values())
    assert list(losses.values()) == sorted(losses.values(), reverse=True)
    late = feature_losses(folder / "float.onnx", tmp_path / "int8.onnx", images[:4], convs, time.monotonic() - 1)
    assert late == {}
    local = {name: 1.0 / (i + 1) for i, name in enumerate(reversed(convs))}  # a different order
    measured = dict(list(losses.items())[:1])
    order = rank(local, measured)
    assert order[0] == next(iter(measured)) and sorted(order) == sorted(convs)
    assert order[1:] == [name for name in local if name not in measured]


def test_gptq_rounding_lowers_the_output_error_it_is_built_to_lower():
    from captioner.engine.infer.quantize.rounding import gptq
    torch.manual_seed(0)
    # Correlated inputs (64 channels mixing 16 sources, as a convolution's input channels do): where moving one
    # column's rounding error onto the others pays.
    x = torch.randn(64, 16, dtype=torch.float64) @ torch.randn(16, 2000, dtype=torch.float64)
    x += 0.05 * torch.randn_like(x)
    w = torch.randn(16, 64, dtype=torch.float64)
    scale = w.abs().amax(dim=1) / 64
    nearest = torch.clamp(torch.round(w / scale.view(-1, 1)), -64, 64)
    q = gptq(w, x @ x.T / x.shape[1], scale, 64)
    assert q.abs().max() <= 64 and torch.equal(q, q.round())

    def output_error(steps):
        return float(((w - steps * scale.view(-1, 1)) @ x).norm())
    assert output_error(q) < 0.8 * output_error(nearest)
    # Per-row H (depthwise): the same result as the shared one repeated.
    per_row = gptq(w, (x @ x.T / x.shape[1]).expand(16, 64, 64), scale, 64)
    assert torch.equal(per_row, q)


def test_round_weights_keeps_the_graph_and_brings_its_output_closer(steep, tmp_path):
    from captioner.engine.infer.quantize.rounding import round_weights
    folder, images, convs = steep
    quantize_encoder(folder / "float.onnx", tmp_path / "int8.onnx", images, "MinMax", [])
    record = round_weights(tmp_path / "int8.onnx", folder / "float.onnx", tmp_path / "rounded.onnx", images)
    assert record["rounded"] == len(convs) and record["left_as_rounded"] == []
    before, after = onnx.load(str(tmp_path / "int8.onnx")), onnx.load(str(tmp_path / "rounded.onnx"))
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    x = {"images": images.numpy()}
    want = _session(folder / "float.onnx").run(None, x)[0]
    error = {name: float(np.linalg.norm(_session(tmp_path / name).run(None, x)[0] - want))
             for name in ("int8.onnx", "rounded.onnx")}
    assert error["rounded.onnx"] < error["int8.onnx"]
