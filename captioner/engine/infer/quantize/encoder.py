"""The encoder's int8 recipe, found by measurement: calibration method, then the nodes kept in float.

    plan = quantize_encoder_measured(float_encoder, out, images, work)   # out: encoder.onnx in int8

1. quant_pre_process (shape inference, BatchNorm folded into Conv); then offset centering (transforms.py), kept
   when its int8 features measure closer to float32's on the held-out images.
2. Every Conv quantized, once per calibration method (calibrate.METHODS), calibrated on 3/4 of the images;
   the method whose features on the other 1/4 are closest to float32's is kept. No node is kept in float by
   rule: on MobileNetV2 the first convolution (reading the image) costs the features 0.004 of cosine in int8,
   the last (writing the features the decoder reads) 0.0001 for 6.7% of the multiply-adds, the first
   depthwise one 0.021; only measurement tells them apart.
3. Sensitivity: each quantized Conv ranked by what it alone costs the features in int8 (ranking.py; by its
   own rounding error, sensitivity.node_errors, where time runs short), and the worst ones kept in
   float in doubling batches until the mean cosine similarity of int8 to float32 features on the held-out
   images reaches FEATURE_BUDGET, with at most MAX_FLOAT_MACS of the multiply-adds in float, all within
   TIME_LIMIT_SECONDS.
4. The int8 weights re-rounded by GPTQ against each convolution's input (rounding.py), kept when the held-out
   features measure closer.
5. The linear layers (MatMul/Gemm with constant weights: a ViT's, ConvNeXt's MLPs) dynamically int8 (linear.py),
   kept when the features still meet the budget.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.engine.infer.quantize.calibrate import choose_method, quantize_encoder, split_held_out
from captioner.engine.infer.quantize.linear import quantize_linear
from captioner.engine.infer.quantize.measure import FeatureProbe
from captioner.engine.infer.quantize.ranking import feature_losses, rank
from captioner.engine.infer.quantize.rounding import round_weights
from captioner.engine.infer.quantize.sensitivity import SearchResult, node_errors, search_exclusions
from captioner.engine.infer.quantize.transforms import choose_centering

log = logging.getLogger("captioner")

# The budget: mean per-image cosine similarity of the int8 encoder's features to float32's, on held-out
# calibration images. An int8 encoder under it is not shipped: the folder keeps the float32 encoder (export's
# --feature-budget). Measured on the real-photo benchmark (docs/quality.md, 5 MobileNetV2 models): at 0.99 the
# average CIDEr-D holds (below ~0.97 it dropped ~10%) but beam search writes other captions on ~40% of the photos;
# captions stay float32's on ~85% of them, each model's CIDEr-D within 3%, only from ~0.999.
FEATURE_BUDGET = 0.99
# The convolutions the sensitivity pass keeps in float do at most this share of the encoder's multiply-adds:
# int8 must stay faster than float32 (issue 35: >= 1.5x ORT float32 for MobileNetV2, ResNet-152 >= 2x PyTorch),
# and a quarter of MobileNetV2's convolutions in float measured no faster than float32 itself.
MAX_FLOAT_MACS = 0.10
# The encoder's quantization time limit, all of it: the methods not started by then are skipped, the sensitivity
# pass stops with the best graph so far (ResNet-152 at 224 px with 64 images otherwise takes ~10 minutes on 2 cores).
TIME_LIMIT_SECONDS = 300.0
RANKING_IMAGES = 8  # calibration images the per-node errors are measured on
ROUNDING_SHARE = 0.2  # of the time limit kept for the weights' rounding (rounding.py) after the search


def conv_costs(model) -> dict[str, float]:
    """{Conv node: its share of all the Conv nodes' multiply-adds}, from the weights' shapes and the inferred
    output sizes (quant_pre_process ran shape inference; a size it could not infer counts as 1x1)."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            grid = [d for d in shapes.get(node.output[0], [])[2:] if d > 0]
            macs[node.name] = math.prod(weights.get(node.input[1], [1])) * math.prod(grid)
    total = sum(macs.values()) or 1
    return {name: m / total for name, m in macs.items()}


@dataclass
class EncoderPlan:
    method: str
    method_errors: dict  # {method: compare() on the held-out images}
    search: SearchResult
    convs: int
    fit_images: int
    held_images: int
    seconds: float
    budget: float
    max_float_macs: float  # the most the sensitivity pass may keep in float, as a share of multiply-adds
    float_macs: float  # the share it kept
    transforms: list = field(default_factory=list)  # float rewrites tried before int8 (transforms.py records)
    feature_losses: dict = field(default_factory=dict)  # {excluded node: ranking.feature_losses}, measured ones
    local_errors: dict = field(default_factory=dict)  # {excluded node: sensitivity.node_errors}
    nodes_measured: int = 0  # nodes ranked by feature loss before the ranking's share of the time ran out
    rounding: dict = field(default_factory=dict)  # rounding.round_weights' record, applied or not, both cosines
    linear: dict = field(default_factory=dict)  # linear.quantize_linear's record, applied or not
    error: dict = field(default_factory=dict)  # compare() of the final graph's features on the held-out images


def quantize_encoder_measured(float_encoder: Path, out: Path, images: torch.Tensor, work: Path,
                              budget: float = FEATURE_BUDGET, max_float_macs: float = MAX_FLOAT_MACS,
                              time_limit: float = TIME_LIMIT_SECONDS) -> EncoderPlan:
    """float_encoder (encoder.onnx, float32) -> out (int8), calibrated on images ((N, 3, S, S) uint8); work: a
    scratch folder. Returns what was chosen and measured (quantization.json's encoder section)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process
    start = time.monotonic()
    prepared = work / "encoder.prepared.onnx"
    # Shape inference and graph folding (BatchNorm into Conv) first: onnxruntime's recommended preparation.
    quant_pre_process(str(float_encoder), str(prepared), skip_symbolic_shape=True)
    convs = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
    fit, held = split_held_out(images)
    # Each step below is measured, which takes up to time_limit in all: a line per step says where it is.
    log.info("int8 1/5: choosing the calibration method (%d images to calibrate, %d held out to measure; "
             "at most %d s in all)", len(fit), len(held), time_limit)
    probe = FeatureProbe(prepared, held)
    deadline = start + time_limit
    # Offset centering is exact in float, so the probe's float32 reference stays the prepared graph's.
    prepared, centering = choose_centering(prepared, work, fit, probe,
                                           lambda graph, out_: quantize_encoder(graph, out_, fit, "MinMax", []))
    choice = choose_method(prepared, work, fit, probe, [], deadline)
    chosen = work / f"encoder-{choice.method}.onnx"
    log.info("int8 2/5: %s ranges chosen (feature cosine %.4f); ranking the %d convolutions by their error",
             choice.method, choice.errors[choice.method]["cosine_mean"], len(convs))
    local = node_errors(prepared, chosen, fit[:RANKING_IMAGES])
    # Measuring each node at the features takes a session per node: at most a third of the time left.
    ranking_deadline = time.monotonic() + (deadline - time.monotonic()) / 3
    losses = feature_losses(prepared, chosen, fit[:RANKING_IMAGES], list(local), ranking_deadline)
    errors = {name: losses.get(name, local[name]) for name in rank(local, losses)}
    made = {(): chosen}  # {nodes in float: the graph}

    def requantize(names: list[str]) -> dict:
        made[tuple(names)] = work / f"encoder-try{len(made)}.onnx"
        quantize_encoder(prepared, made[tuple(names)], fit, choice.method, names, choice.cache)
        return probe.error(made[tuple(names)])

    log.info("int8 3/5: keeping the worst convolutions in float until the features reach cosine %.2f", budget)
    costs = conv_costs(onnx.load(str(prepared)))
    search = search_exclusions(errors, requantize, choice.errors[choice.method], budget, costs, max_float_macs,
                               deadline - ROUNDING_SHARE * time_limit)
    searched = made[tuple(search.excluded)]
    log.info("int8 4/5: %d kept in float (cosine %.4f); rounding the int8 weights (GPTQ)", len(search.excluded),
             search.error["cosine_mean"])
    rounding = round_weights(searched, prepared, work / "encoder-rounded.onnx", fit, deadline)
    rounded_error = probe.error(work / "encoder-rounded.onnx")
    # Kept only when measured closer on the held-out images, like every other step.
    applied = rounded_error["cosine_mean"] > search.error["cosine_mean"]
    rounding.update(applied=applied, cosine_before=search.error["cosine_mean"],
                    cosine_after=rounded_error["cosine_mean"])
    final = rounded_error if applied else search.error
    log.info("int8 5/5: cosine %.4f; the linear layers (MatMul/Gemm), if any", final["cosine_mean"])
    linear = quantize_linear(work / "encoder-rounded.onnx" if applied else searched, out, probe, budget, final,
                             deadline)
    final = linear.pop("error", final)
    if linear["nodes"] and not linear["applied"]:
        log.warning("int8: the encoder's %d linear layers stay float32 (%s); its int8 graph will run about as "
                    "fast as float32", linear["nodes"], linear["why"])
    return EncoderPlan(choice.method, choice.errors, search, len(convs), len(fit), len(held),
                       round(time.monotonic() - start, 1), budget, max_float_macs,
                       round(sum(costs[n] for n in search.excluded), 4), [centering],
                       {name: round(losses[name], 6) for name in search.excluded if name in losses},
                       {name: round(local[name], 6) for name in search.excluded}, len(losses), rounding, linear, final)
