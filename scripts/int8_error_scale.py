"""How close must int8 features be to keep the captions? A model folder whose encoder gives float32's features
plus `scale` times int8's error, for bench_onnx_accuracy.py's --error-scales.

    error_scaled_folder(fp32_folder, int8_folder, 0.5, out)   # out: fp32's folder, encoder.onnx blended

scale 1 is the int8 encoder with float32's decoder graphs; 0.5 halves the error everywhere (as one more bit of
precision throughout would), 0 is float32. The blended graph runs both encoders on the same uint8 images, so the
error's direction is int8's own: not a model of it (random noise), the measured thing made smaller.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def error_scaled_encoder(fp32: Path, int8: Path, scale: float, out: Path) -> None:
    """out: one ONNX graph, images -> features_fp32 + scale * (features_int8 - features_fp32), from the two
    encoder.onnx files (same input "images", same output "features")."""
    import onnx
    from onnx import compose, helper, numpy_helper
    base, quantized = onnx.load(str(fp32)), compose.add_prefix(onnx.load(str(int8)), "int8/")
    for node in base.graph.node:  # the float graph's output becomes an inner value
        node.output[:] = ["features/fp32" if name == "features" else name for name in node.output]
    blend = [helper.make_node("Identity", ["images"], ["int8/images"]),
             helper.make_node("Sub", ["int8/features", "features/fp32"], ["features/error"]),
             helper.make_node("Mul", ["features/error", "features/scale"], ["features/scaled_error"]),
             helper.make_node("Add", ["features/fp32", "features/scaled_error"], ["features"])]
    graph = helper.make_graph(
        list(base.graph.node) + blend[:1] + list(quantized.graph.node) + blend[1:], "error_scaled_encoder",
        list(base.graph.input), list(base.graph.output),
        list(base.graph.initializer) + list(quantized.graph.initializer)
        + [numpy_helper.from_array(np.array(scale, np.float32), "features/scale")])
    model = helper.make_model(graph, opset_imports=list(quantized.opset_import))  # int8's: a superset of fp32's
    model.ir_version = max(base.ir_version, quantized.ir_version)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def error_scaled_folder(fp32_folder: Path, int8_folder: Path, scale: float, out: Path) -> Path:
    """out: a copy of the float32 ONNX folder whose encoder.onnx is error_scaled_encoder's blend at scale."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(fp32_folder, out)
    error_scaled_encoder(fp32_folder / "encoder.onnx", int8_folder / "encoder.onnx", scale, out / "encoder.onnx")
    return out
