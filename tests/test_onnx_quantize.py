"""The int8 recipe by measurement (engine/infer/quantize/): the calibration method is the one measured closest,
the sensitivity pass keeps nodes in float only while they help and only as many as the budget needs, and
quantization.json says what was chosen and measured."""
from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("onnxruntime")

from captioner.config import EncoderConfig, ModelConfig  # noqa: E402
from captioner.engine.infer.onnx_export import export_graphs, quantize_graphs  # noqa: E402
from captioner.engine.infer.quantize.calibrate import split_held_out  # noqa: E402
from captioner.engine.infer.quantize.encoder import FEATURE_BUDGET, quantize_encoder_measured  # noqa: E402
from captioner.engine.infer.quantize.measure import compare  # noqa: E402
from captioner.engine.infer.quantize.sensitivity import search_exclusions  # noqa: E402
from captioner.model.caption_model import CaptionModel  # noqa: E402

from helpers import COCO_MINI  # noqa: E402


def _error(cosine: float) -> dict:
    return {"images": 4, "cosine_mean": cosine, "cosine_min": cosine, "relative_error": 1 - cosine}


NODES = {"a": 0.9, "harmful": 0.5, "b": 0.3, "c": 0.2, "d": 0.1}  # local errors, worst first


def _requantize(names):
    """A made-up graph: each node in float adds its local error / 10 to the cosine, 'harmful' costs 0.3."""
    return _error(0.9 + sum(NODES[n] / 10 for n in names if n != "harmful") - 0.3 * ("harmful" in names))


COSTS = {name: 0.1 for name in NODES}  # each node 10% of the multiply-adds


def test_search_keeps_nothing_when_the_budget_holds():
    result = search_exclusions(NODES, _requantize, _error(0.9), 0.85, COSTS, 1.0, time.monotonic() + 60)
    assert result.excluded == {} and result.met and len(result.rounds) == 1


def test_search_excludes_the_worst_nodes_until_the_budget_holds_and_drops_a_harmful_one():
    result = search_exclusions(NODES, _requantize, _error(0.9), 0.995, COSTS, 1.0, time.monotonic() + 60)
    assert result.met and list(result.excluded) == ["a", "b"]  # 0.9 + 0.09 < 0.995 <= 0.9 + 0.09 + 0.03; harmful rejected
    assert [r["added"] for r in result.rounds] == [[], ["a"], ["harmful", "b"], ["harmful"], ["b"]]
    assert [r["kept"] for r in result.rounds] == [True, True, False, False, True]


def test_search_stops_at_the_cost_limit_and_says_so():
    result = search_exclusions(NODES, _requantize, _error(0.9), 1.5, COSTS, 0.2, time.monotonic() + 60)
    assert not result.met and list(result.excluded) == ["a", "b"]  # 20% of the multiply-adds at most
    assert "(2 in float, 2 passed by: float multiply-adds at most 20%)" in result.why_stopped  # c, d
    late = search_exclusions(NODES, _requantize, _error(0.9), 1.5, COSTS, 1.0, time.monotonic() - 1)
    assert late.excluded == {} and "time allowed ran out" in late.why_stopped


def test_held_out_split_and_compare():
    images = torch.arange(8).view(8, 1, 1, 1).to(torch.uint8)
    fit, held = split_held_out(images)
    assert held.flatten().tolist() == [3, 7] and fit.flatten().tolist() == [0, 1, 2, 4, 5, 6]
    one = images[:1]
    assert split_held_out(one)[1].equal(one)
    ref = torch.randn(3, 5).double().numpy()
    assert compare(ref, ref)["cosine_mean"] == 1.0 and compare(ref, -ref)["cosine_min"] == -1.0


def _photos(size: int, count: int) -> torch.Tensor:
    from captioner.engine.infer.onnx_export import calibration_images
    paths = sorted(str(p) for p in (COCO_MINI / "train2017").glob("*.jpg"))
    if not paths:  # a checkout without ../shared beside it: skip, never a failure
        pytest.skip(f"needs the real photos of {COCO_MINI / 'train2017'}")
    return calibration_images(paths, size, count)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=64), ModelConfig(32, 32, 48), 40).eval()
    folder = tmp_path_factory.mktemp("fp32")
    export_graphs(model, folder)
    return folder


@pytest.mark.slow  # quantizes a ResNet-18 three ways and again per try (about 20 s each on 2 busy cores)
@pytest.mark.parametrize("budget", [0.0, 1.01])
def test_sensitivity_pass_in_a_real_graph(resnet18, tmp_path, budget):
    """A loose budget keeps no node in float; an unreachable one keeps some (each measured to help), stops at
    the most allowed or when nothing more helps, and says the budget does not hold."""
    work = tmp_path / "work"
    work.mkdir()
    plan = quantize_encoder_measured(resnet18 / "encoder.onnx", tmp_path / "encoder.onnx", _photos(64, 8), work,
                                     budget=budget, time_limit=120)
    assert set(plan.method_errors) == {"MinMax", "Percentile", "Percentile-99.99", "Entropy"}
    assert plan.method_errors[plan.method]["cosine_mean"] == max(e["cosine_mean"] for e in plan.method_errors.values())
    if budget == 0.0:
        assert plan.search.met and plan.search.excluded == {}
    else:
        assert not plan.search.met and plan.search.excluded and 0 < plan.float_macs <= plan.max_float_macs
        assert plan.search.error["cosine_mean"] > plan.method_errors[plan.method]["cosine_mean"]
        kept = [name for r in plan.search.rounds if r["kept"] for name in r["added"]]
        assert kept == list(plan.search.excluded)  # exactly the tries that helped


@pytest.mark.slow  # quantizes a full-size MobileNetV2 (3 calibration methods, the sensitivity pass)
def test_int8_mobilenet_v2_meets_the_budget_it_records(tmp_path):
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="mobilenet_v2", layer="features", image_size=224),
                         ModelConfig(32, 32, 48), 40).eval()
    export_graphs(model, tmp_path / "fp32")
    quantize_graphs(tmp_path / "fp32", tmp_path / "int8", _photos(224, 16), "coco-mini train2017")
    record = json.loads((tmp_path / "int8" / "quantization.json").read_text())
    error, budget = record["feature_error"], record["budget"]
    assert budget == {**budget, "metric": "cosine_mean", "min": FEATURE_BUDGET}
    assert error["budget_met"] and error["cosine_mean"] >= FEATURE_BUDGET and error["images"] == 4
    assert record["calibration"]["source"] == "coco-mini train2017" and record["calibration"]["count"] == 16
    excluded = record["encoder"]["excluded_nodes"]
    # Nothing is kept in float by rule (the first and last convolutions are measured like the rest): a node in
    # float is one the sensitivity pass measured to help, with its feature loss stated.
    assert set(excluded) == set(record["encoder"]["excluded_why"])
    assert all(why.startswith("sensitivity: ") for why in record["encoder"]["excluded_why"].values())


# ---------------------------------------------------------------- the linear layers (linear.py)


def _linear_encoder(path, seed: int = 0):
    """images (B, 3, 4, 4) uint8 -> features (B, 3, 4, 16): a float Linear layer (MatMul by a constant, 4 -> 16
    on the last axis) and one activation-by-activation MatMul (x by its own transpose), as a ViT's attention has."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    weight = np.random.default_rng(seed).standard_normal((4, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "weight"], ["y"], name="linear"),
         helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]),
         helper.make_node("MatMul", ["xt", "x"], ["gram"], name="scores"),
         helper.make_node("MatMul", ["gram", "y"], ["features"], name="mix")],
        "encoder", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", 3, 4, 16])],
        [numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("budget, applied", [(0.9, True), (1.0001, False)])
def test_linear_layers_int8_only_within_the_budget(tmp_path, budget, applied):
    import onnx
    from captioner.engine.infer.quantize.linear import linear_nodes, quantize_linear
    from captioner.engine.infer.quantize.measure import FeatureProbe
    encoder = _linear_encoder(tmp_path / "encoder.onnx")
    assert linear_nodes(onnx.load(str(encoder))) == {"linear": 64}  # constant weights only: not the products
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = FeatureProbe(encoder, images)
    before = probe.error(encoder)
    record = quantize_linear(encoder, tmp_path / "out.onnx", probe, budget, before)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node]
    assert record["nodes"] == 1 and record["applied"] is applied
    assert ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops) is applied
    assert ops.count("MatMul") == (2 if applied else 3)  # the activation products stay float either way
    assert record["cosine_before"] == before["cosine_mean"] == 1.0 and 0.99 < record["cosine_after"] < 1.0
    assert record["error"] == (probe.error(tmp_path / "out.onnx") if applied else before)
    assert ("meeting the budget" if applied else "kept in float") in record["why"]
    assert not (tmp_path / "encoder-linear.onnx").exists()  # the candidate does not linger


def test_a_graph_without_linear_layers_is_copied(tmp_path):
    from captioner.engine.infer.quantize.linear import quantize_linear
    encoder = tmp_path / "encoder.onnx"
    torch.manual_seed(0)
    model = CaptionModel(EncoderConfig(arch="resnet18", image_size=32), ModelConfig(16, 16, 16), 10).eval()
    export_graphs(model, tmp_path)
    record = quantize_linear(encoder, tmp_path / "out.onnx", None, FEATURE_BUDGET, {})
    assert record == {"nodes": 0, "applied": False, "why": "no MatMul or Gemm with constant weights"}
    assert (tmp_path / "out.onnx").read_bytes() == encoder.read_bytes()


def _outlier_encoder(path):
    """images (B, 3, 4, 4) uint8 -> features (B, 3, 4, 80): five Linear layers side by side, each a fifth of the
    weights. "outlier" reads x with its last input channel 1000x larger (its weights 1000x smaller, so each channel
    counts alike in float), as a transformer's outlier channel: one per-tensor int8 range for its input flattens
    the other channels to zero. "plain0".."plain3" read x as it is."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    scale = np.array([1, 1, 1, 1000], np.float32)
    plain = [f"plain{i}" for i in range(4)]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "scale"], ["wide"]),
         helper.make_node("MatMul", ["wide", "w_outlier"], ["outlier_out"], name="outlier"),
         *[helper.make_node("MatMul", ["x", f"w_{n}"], [f"{n}_out"], name=n) for n in plain],
         helper.make_node("Concat", ["outlier_out"] + [f"{n}_out" for n in plain], ["features"], axis=-1)],
        "encoder", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 3, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", 3, 4, 80])],
        [numpy_helper.from_array(scale, "scale"),
         numpy_helper.from_array((rng.standard_normal((4, 16)) / scale[:, None]).astype(np.float32), "w_outlier"),
         *[numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), f"w_{n}") for n in plain]])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_linear_sensitivity_keeps_the_outlier_layer_in_float(tmp_path):
    """All linear layers int8 miss the budget; the pass keeps only the one whose input has an outlier channel in
    float, and the others stay int8."""
    import onnx
    from captioner.engine.infer.quantize.linear import quantize_linear
    from captioner.engine.infer.quantize.measure import FeatureProbe
    encoder = _outlier_encoder(tmp_path / "encoder.onnx")
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = FeatureProbe(encoder, images)
    record = quantize_linear(encoder, tmp_path / "out.onnx", probe, 0.99, probe.error(encoder))
    tries = record["sensitivity"]["tries"]
    assert tries[0]["cosine_mean"] < 0.99  # every layer int8: the outlier flattens the rest of its input
    assert record["applied"] and record["in_float"] == ["outlier"] and record["cosine_after"] >= 0.99
    assert record["why"].startswith("with 4 of the 5 linear layers int8")
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node}
    assert nodes["outlier"] == "MatMul" and not {"plain0", "plain3"} & set(nodes)  # the others: integer products
    assert record["error"] == probe.error(tmp_path / "out.onnx")
