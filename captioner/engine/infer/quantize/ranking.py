"""Which convolutions hurt the features most when int8: each one quantized alone, measured at the features.

    losses = feature_losses(prepared, quantized, images, order, deadline)   # {conv: 1 - cosine}, worst first

The local error (sensitivity.node_errors) ranks by what rounding costs at a node's own output, before its
activation. It misses the nodes that matter most on depthwise networks: MobileNetV2's first depthwise
convolution has channels with weights up to ~95 behind a ReLU6, steep threshold detectors whose [0, 6] output
moves a lot for a small weight error that is small against the pre-activation (local error 0.05, 4th of 50;
alone it costs 0.026 of the features' cosine, ten times the next node). So each node is measured as the
search will use it: the float graph with only that node's input quantize-dequantized and its weights replaced
by their int8 values, its features against float32's on a few calibration images. One onnxruntime session per
node (MobileNetV2: 50 nodes in ~7 s); nodes are measured in local-error order until the deadline, and the ones
not reached keep their local-error order after the measured ones.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from captioner.engine.infer.quantize.graph import qdq_inputs
from captioner.engine.infer.quantize.measure import compare, run_encoder


def _with_one_node_int8(float_model, node_name: str, scale, zero, weight: np.ndarray):
    """A copy of float_model whose node reads its input through uint8 quantize-dequantize (scale, zero) and
    uses weight (the int8 weights, dequantized) instead of its float ones."""
    from onnx import ModelProto, helper, numpy_helper
    model = ModelProto()
    model.CopyFrom(float_model)
    nodes = list(model.graph.node)
    target = next(n for n in nodes if n.name == node_name)
    probe = node_name + "_int8_probe"
    weight_name = probe + "_weight"  # a new initializer: the float weight may be shared with another node
    model.graph.initializer.extend([
        numpy_helper.from_array(weight.astype(np.float32), weight_name),
        numpy_helper.from_array(np.asarray(scale, dtype=np.float32), probe + "_scale"),
        numpy_helper.from_array(np.asarray(zero, dtype=np.uint8), probe + "_zero")])
    quantize = helper.make_node("QuantizeLinear", [target.input[0], probe + "_scale", probe + "_zero"],
                                [probe + "_q"], name=probe + "_Q")
    dequantize = helper.make_node("DequantizeLinear", [probe + "_q", probe + "_scale", probe + "_zero"],
                                  [probe + "_dq"], name=probe + "_DQ")
    target.input[0], target.input[1] = probe + "_dq", weight_name
    at = nodes.index(target)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[:at] + [quantize, dequantize] + nodes[at:])
    return model


def feature_losses(prepared: Path, quantized: Path, images: torch.Tensor, order: list[str],
                   deadline: float = float("inf")) -> dict[str, float]:
    """{Conv node: 1 - mean cosine similarity of the features to float32's with only that node int8}, largest
    first, for the nodes of order (quantized in quantized, a QDQ graph made from prepared) measured on images
    ((N, 3, S, S) uint8) before time.monotonic() passes deadline."""
    import onnx
    float_model = onnx.load(str(prepared))
    qdq = qdq_inputs(onnx.load(str(quantized)))
    reference = run_encoder(prepared, images)
    losses = {}
    for name in order:
        if time.monotonic() > deadline:
            break
        if name not in qdq:
            continue
        scale, zero, w_int, w_scale = qdq[name]
        w_scale = np.reshape(w_scale, (-1,) + (1,) * (w_int.ndim - 1)) if np.ndim(w_scale) else w_scale
        model = _with_one_node_int8(float_model, name, scale, zero, w_int * w_scale)
        features = run_encoder(model.SerializeToString(), images)
        losses[name] = max(0.0, 1.0 - compare(reference, features)["cosine_mean"])
    return dict(sorted(losses.items(), key=lambda kv: -kv[1]))


def rank(local: dict[str, float], losses: dict[str, float]) -> list[str]:
    """The search's order: the measured nodes by feature loss, then the rest by local error."""
    return list(losses) + [name for name in local if name not in losses]
