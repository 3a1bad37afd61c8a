"""Dynamic int8 with a range per row (quantize/rowwise.py): a row's result does not depend on the other rows of its
batch, at every onnxruntime optimization level, and stays close to float32's however large or small the row."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from captioner.engine.infer.quantize.rowwise import make_rowwise, quantize_dynamic_rowwise  # noqa: E402


def _graph(path):
    """x (B, 32) -> y (B, 24) = Gemm(x, W1ᵀ) + b1; score (B, 1) = y @ w2 (a one-column product, like the
    attention's score); x3 (B, 5, 32) -> z (B, 5, 20) = x3 @ W3 (a token grid, as in a ViT)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((24, 32)), "b1": rng.standard_normal(24), "w2": rng.standard_normal((24, 1)),
             "w3": rng.standard_normal((32, 20))}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["y"], name="gemm", transB=1),
         helper.make_node("MatMul", ["y", "w2"], ["score"], name="score"),
         helper.make_node("MatMul", ["x3", "w3"], ["z"], name="tokens")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 32]),
              helper.make_tensor_value_info("x3", TensorProto.FLOAT, ["B", 5, 32])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "score", "z")],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path, feed, optimize=True):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _inputs():
    """Rows of very different sizes (0.01 to 100), and one row of zeros."""
    rng = np.random.default_rng(1)
    sizes = np.array([0.01, 1.0, 100.0, 0.3, 5.0, 0.0], np.float32)
    return {"x": (rng.standard_normal((6, 32)) * sizes[:, None]).astype(np.float32),
            "x3": (rng.standard_normal((6, 5, 32)) * sizes[:, None, None]).astype(np.float32)}


def test_each_row_alone_equals_it_in_the_batch_and_stays_close(tmp_path):
    import onnx
    source = _graph(tmp_path / "float.onnx")
    assert quantize_dynamic_rowwise(source, tmp_path / "int8.onnx") == 2  # x and x3; not the one-column product
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert ops["score"] == "MatMul" and "gemm" not in ops and "tokens" not in ops
    assert "DynamicQuantizeLinear" not in ops.values()
    feed = _inputs()
    exact = _run(source, feed)
    batched = {optimize: _run(tmp_path / "int8.onnx", feed, optimize) for optimize in (True, False)}
    for row in range(6):
        alone = _run(tmp_path / "int8.onnx", {k: v[row:row + 1] for k, v in feed.items()})
        for out, name in ((0, "y"), (2, "z")):
            assert np.array_equal(alone[out][0], batched[True][out][row]), (name, row)
            reference = exact[out][row]
            assert np.allclose(batched[True][out][row], batched[False][out][row], rtol=1e-5, atol=1e-6)
            if row == 5:  # a row of zeros: the bias alone (y) or zeros (z), no NaN
                assert np.array_equal(batched[True][out][row], exact[out][row])
            else:  # 7-bit weights, 8-bit rows: within a few percent of float32, even the 0.01-size row
                error = np.abs(batched[True][out][row] - reference).max() / np.abs(reference).max()
                assert error < 0.05, (name, row, error)


def test_onnxruntimes_per_tensor_ranges_were_batch_dependent(tmp_path):
    """Why the rewrite exists: with one range per tensor, the 0.01-size row is flattened by the 100-size one in
    the same batch, and not when it is alone."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    source = _graph(tmp_path / "float.onnx")
    quantize_dynamic(str(source), str(tmp_path / "tensor.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True)
    feed = _inputs()
    batched = _run(tmp_path / "tensor.onnx", feed)[0][0]
    alone = _run(tmp_path / "tensor.onnx", {k: v[:1] for k, v in feed.items()})[0][0]
    assert not np.allclose(batched, alone, rtol=1e-3)


def test_make_rowwise_on_a_graph_without_dynamic_quantization_changes_nothing(tmp_path):
    import onnx
    model = onnx.load(str(_graph(tmp_path / "float.onnx")))
    before = model.SerializeToString()
    assert make_rowwise(model) == 0
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in onnx.load_from_string(before).graph.node]
