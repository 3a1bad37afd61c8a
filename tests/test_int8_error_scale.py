"""scripts/int8_error_scale.py: the blended encoder gives float32's features plus exactly `scale` times the other
graph's difference, on the same uint8 images, and the folder copy runs through onnxruntime like any ONNX folder."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import int8_error_scale  # noqa: E402

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _encoder(path: Path, factor: float, offset: float) -> Path:
    """images (B, 3, 4, 4) uint8 -> features (B, 3, 4, 4) = images * factor + offset, named as export names them."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "factor"], ["y"]), helper.make_node("Add", ["y", "offset"], ["features"])],
        "encoder", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", 3, 4, 4])],
        [numpy_helper.from_array(np.array(factor, np.float32), "factor"),
         numpy_helper.from_array(np.array(offset, np.float32), "offset")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]


@pytest.mark.parametrize("scale", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_blend_is_float32_plus_scaled_difference(tmp_path, scale):
    fp32 = _encoder(tmp_path / "fp32.onnx", 0.5, 1.0)
    other = _encoder(tmp_path / "int8.onnx", 0.25, -3.0)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    int8_error_scale.error_scaled_encoder(fp32, other, scale, tmp_path / "blend.onnx")
    a, b = _run(fp32, images), _run(other, images)
    np.testing.assert_allclose(_run(tmp_path / "blend.onnx", images), a + scale * (b - a), rtol=1e-6, atol=1e-5)


def test_folder_copy_replaces_only_the_encoder(tmp_path):
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    fp32.mkdir(), int8.mkdir()
    _encoder(fp32 / "encoder.onnx", 1.0, 0.0), _encoder(int8 / "encoder.onnx", 2.0, 0.0)
    (fp32 / "decoder_step.onnx").write_bytes(b"decoder bytes")
    (fp32 / "onnx.json").write_text("{}")
    out = int8_error_scale.error_scaled_folder(fp32, int8, 0.5, tmp_path / "scaled")
    assert (out / "decoder_step.onnx").read_bytes() == b"decoder bytes"
    assert (out / "onnx.json").read_text() == "{}"
    images = np.full((1, 3, 4, 4), 10, np.uint8)
    np.testing.assert_allclose(_run(out / "encoder.onnx", images), 15.0)
