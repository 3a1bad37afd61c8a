"""Which convolutions to keep in float32: each one's own quantization error, then the worst ones excluded in
doubling batches until the int8 features meet the budget.

    errors = node_errors(prepared, quantized, images)         # {conv name: its local error}, worst first
    result = search_exclusions(errors, requantize, budget, …) # requantize(excluded) -> compare() of its features

A node's local error is what rounding costs at that node alone, with float inputs: its output computed from its
input activation through the calibrated uint8 quantize-dequantize and its per-channel int8 weights, against its
float output, as a relative L2 error. One float run ranks every node (no re-quantization per node); the search
then re-quantizes once per batch (1, 2, 4, 8, … nodes; a batch that does not help is retried by halves), so
its cost grows with log2 of the exclusions plus the nodes rejected.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from captioner.engine.infer.quantize.graph import attribute, initializer_arrays, qdq_inputs

log = logging.getLogger("captioner")


def _conv(node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """An ONNX Conv node (2-D, symmetric pads) in PyTorch."""
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    return F.conv2d(x, w, b, stride=list(attribute(node, "strides", [1, 1])), padding=pads[:2],
                    dilation=list(attribute(node, "dilations", [1, 1])), groups=int(attribute(node, "group", 1)))


def node_errors(prepared: Path, quantized: Path, images: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """{Conv node name: local quantization error}, largest first, for the Conv nodes quantized in quantized
    (a QDQ graph made from prepared), measured on images ((N, 3, S, S) uint8) through prepared's float run.

    The error is at the node's output, relative to it: conv(q(x), q(W)) against conv(x, W) with x the float
    input. Measured at the input instead, it misses the worst case: MobileNetV2's expand convolutions read
    channels with a large constant offset and little variation, which per-tensor uint8 steps blur, and which the
    convolution's large bias then cancels (1% input error, 120% output error on a pretrained model)."""
    import onnx
    from onnx import helper

    from captioner.engine.infer.quantize.measure import session
    float_model, q_model = onnx.load(str(prepared)), onnx.load(str(quantized))
    qdq = qdq_inputs(q_model)
    init = initializer_arrays(float_model)
    convs = {n.name: n for n in float_model.graph.node
             if n.op_type == "Conv" and n.name in qdq and len(init[n.input[1]].shape) == 4}
    params = {}
    for name, node in convs.items():
        w = init[node.input[1]]
        scale, zero, w_int, w_scale = qdq[name]
        w_scale = np.reshape(w_scale, (-1, 1, 1, 1)) if np.ndim(w_scale) else w_scale
        bias = torch.tensor(init[node.input[2]]) if len(node.input) > 2 else None
        params[name] = (torch.tensor(w), torch.from_numpy((w_int * w_scale).astype(np.float32)), bias,
                        float(scale), float(zero))
    # Every quantized Conv's input becomes a graph output of the float graph, to read it directly.
    inputs = {node.input[0] for node in convs.values()}
    outputs = {o.name for o in float_model.graph.output}
    float_model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in sorted(inputs - outputs))
    with_inputs = Path(quantized).with_name("encoder-activations.onnx")
    onnx.save(float_model, str(with_inputs))
    run = session(with_inputs)
    names = [o.name for o in run.get_outputs()]
    squared = {name: [0.0, 0.0] for name in convs}  # {node: [sum (y_q - y)^2, sum y^2]}
    with torch.no_grad():
        for part in images.split(batch):
            values = dict(zip(names, run.run(None, {"images": part.contiguous().numpy()})))
            for name, node in convs.items():
                w, w_q, bias, scale, zero = params[name]
                x = torch.from_numpy(values[node.input[0]])
                x_q = ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)  # uint8 activations
                y, y_q = _conv(node, x, w, bias), _conv(node, x_q, w_q, bias)
                squared[name][0] += float((y_q - y).double().square().sum())
                squared[name][1] += float(y.double().square().sum())
    del run
    with_inputs.unlink()
    errors = {name: float(np.sqrt(num / max(den, 1e-30))) for name, (num, den) in squared.items()}
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


@dataclass
class SearchResult:
    excluded: dict[str, float]  # {node: its ranking score}, the nodes the sensitivity pass kept in float
    error: dict  # compare() of the final graph's features
    met: bool  # the budget holds on the final graph
    rounds: list = field(default_factory=list)  # each try, in order: the nodes added, kept or not, the error
    why_stopped: str = ""


def search_exclusions(errors: dict[str, float], requantize, first: dict, budget: float, costs: dict[str, float],
                      max_cost: float, deadline: float) -> SearchResult:
    """Keeps errors' worst nodes in float, in batches of doubling size (1, 2, 4, …), until requantize's features
    have mean cosine similarity >= budget, every node was tried, or time.monotonic() passes deadline; the nodes
    in float cost at most max_cost in all (costs: {node: its share of the encoder's multiply-adds}; a node that
    would go over is passed by). A batch is kept only when it brings the features closer to float32's
    (measured, not assumed: onnxruntime's graph optimizations can make a float node amid int8 ones worse); a
    rejected batch is retried by halves, so a single harmful node is dropped and its neighbours still tried.
    first: compare() of the graph with none of them excluded; requantize(names) -> compare() with names in
    float."""
    ranked, kept, best = list(errors), [], first
    rounds = [{"added": [], "kept": True, "cosine_mean": first["cosine_mean"],
               "relative_error": first["relative_error"]}]
    position, size, passed = 0, 1, []
    while best["cosine_mean"] < budget:
        if position >= len(ranked):
            why = (f"the budget does not hold with every one of the {len(ranked)} nodes tried or over the cost "
                   f"limit ({len(kept)} in float, {len(passed)} passed by: float multiply-adds at most "
                   f"{max_cost:.0%})")
            break
        if time.monotonic() > deadline:
            why = f"the time allowed ran out after {len(rounds)} tries ({len(kept)} nodes in float)"
            break
        spent = sum(costs[n] for n in kept)
        batch = ranked[position:position + size]
        while batch and spent + sum(costs[n] for n in batch) > max_cost:
            batch = batch[:-1]
        if not batch:  # the next node alone would cost too much in float
            passed.append(ranked[position])
            position, size = position + 1, 1
            continue
        error = requantize(kept + batch)
        better = error["cosine_mean"] > best["cosine_mean"]
        rounds.append({"added": batch, "kept": better, "cosine_mean": error["cosine_mean"],
                       "relative_error": error["relative_error"]})
        log.debug("int8 sensitivity: %s %s -> %s", "kept" if better else "rejected", batch, error)
        if better:
            kept, best, position, size = kept + batch, error, position + len(batch), size * 2
        elif len(batch) > 1:
            size = len(batch) // 2  # retry the first half of the same nodes
        else:
            position, size = position + 1, 1
    else:
        why = (f"the budget holds with {len(kept)} nodes in float" if kept
               else "the budget holds with no node in float")
    return SearchResult({n: errors[n] for n in kept}, best, best["cosine_mean"] >= budget, rounds, why)
