"""The encoder's linear layers in int8: what the convolution pass leaves in float.

    record = quantize_linear(encoder, out, probe, budget, probe.error(encoder))  # out: linear layers int8 or a copy

A ViT or an open_clip tower does nearly all its work in MatMul/Gemm nodes with constant weights (the attention's
projections, the MLPs), and so do ConvNeXt's MLPs (timm writes them as Linear layers). Static QDQ quantization of
the convolutions alone left them float: a ViT-S/16's "int8" encoder ran no faster than float32 (57.7 ms against
52.6 ms for 8 images at one thread), ConvNeXt-T's 1.1x. Here they are quantized dynamically, as the decoder's are
and as transformers' CPU int8 usually is: weights int8 per output channel, activations quantized per call, each
token's row with its own range (rowwise.py; no calibration: a transformer's activations carry outliers a fixed range clips). ViT-S/16 then
runs 2.3x float32, ConvNeXt-T 2.3x (random weights). The attention's activation-by-activation products (queries
by keys) stay float.

Kept, like every other step, only on measurement: when the features with them int8 still meet the budget (mean
cosine similarity to float32's on the held-out calibration images). When all of them int8 miss it but float32
met it, a sensitivity pass like the convolutions' (sensitivity.search_exclusions) keeps the worst in float: each
layer alone int8 ranked by what it costs the features, the worst kept float in doubling batches, at most
MAX_FLOAT_SHARE of the linear weights. A transformer's activation outliers sit in a few layers (one wide input
channel flattens a per-tensor range for the rest), so a few layers in float can buy the budget back for the
others' speed. Else the graph is left as it was and the record says why.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from captioner.engine.infer.quantize.rowwise import ROWWISE, quantize_dynamic_rowwise, wide_products
from captioner.engine.infer.quantize.sensitivity import search_exclusions

LINEAR_OPS = ("MatMul", "Gemm")
# The linear layers the sensitivity pass may keep in float, as a share of their weights (their multiply-adds,
# tokens being the same for every layer of a ViT): past a quarter, int8 gives back little of its speed.
MAX_FLOAT_SHARE = 0.25


def linear_nodes(model) -> dict[str, int]:
    """{name: weight element count} of model's MatMul/Gemm nodes whose second input (the weight) is a constant
    with enough output columns to gain from int8 (rowwise.wide_products): the linear layers, in graph order."""
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    sizes |= {n.output[0]: 1 for n in model.graph.node if n.op_type == "Constant"}
    wide = set(wide_products(model))
    return {n.name: sizes[n.input[1]] for n in model.graph.node if n.name in wide}


def quantize_linear(encoder: Path, out: Path, probe, budget: float, before: dict,
                    deadline: float = float("inf")) -> dict:
    """out (another file than encoder): encoder with its linear layers dynamically int8 (per-channel 7-bit weights,
    calibrate.py says why), the sensitivity pass's in float, when its features on probe's images then meet budget;
    else a copy of encoder (before: probe.error(encoder), already measured). Candidates are written beside
    encoder (a scratch folder), one at a time. The ranking stops at time.monotonic() > deadline (the nodes not
    reached rank last). Returns the record (quantization.json's encoder.linear_layers), applied or not."""
    import onnx
    sizes = linear_nodes(onnx.load(str(encoder)))
    names = list(sizes)
    if not names:
        shutil.copyfile(encoder, out)
        return {"nodes": 0, "applied": False, "why": "no MatMul or Gemm with constant weights"}
    candidate = Path(encoder).with_name("encoder-linear.onnx")

    def requantize(in_float) -> dict:
        skipped = set(in_float)
        quantize_dynamic_rowwise(encoder, candidate, nodes=[n for n in names if n not in skipped])
        return probe.error(candidate)

    after, in_float, search = requantize([]), [], None
    if after["cosine_mean"] < budget <= before["cosine_mean"]:
        losses = {}
        for name in names:  # each alone int8: what it costs the features
            if time.monotonic() > deadline:
                break
            losses[name] = 1 - requantize([n for n in names if n != name])["cosine_mean"]
        ranked = {n: losses.get(n, 0.0) for n in sorted(names, key=lambda n: -losses.get(n, 0.0))}
        total = sum(sizes.values())
        search = search_exclusions(ranked, requantize, after, budget, {n: sizes[n] / total for n in names},
                                   MAX_FLOAT_SHARE, float("inf"))
        in_float = list(search.excluded)
        after = requantize(in_float)  # the search's last try may have been a rejected one
    applied = after["cosine_mean"] >= budget
    shutil.copyfile(candidate if applied else encoder, out)
    candidate.unlink()
    int8 = len(names) - len(in_float)
    why = (f"with {int8} of the {len(names)} linear layers int8 the features reach cosine "
           f"{after['cosine_mean']:.4f}, " + (f"meeting the budget {budget:g}" if applied
                                              else f"under the budget {budget:g}: all kept in float"))
    record = {"method": "dynamic", "op_types": list(LINEAR_OPS), "per_channel": True, "weight_type": "int8",
              "reduce_range": True, "activations": ROWWISE, "nodes": len(names), "applied": applied,
              "in_float": in_float if applied else [],
              "cosine_before": before["cosine_mean"], "cosine_after": after["cosine_mean"], "why": why,
              "error": after if applied else before}
    if search is not None:
        record["sensitivity"] = {"ranked_by": "1 - mean cosine of the features with only the layer int8",
                                 "max_float_share": MAX_FLOAT_SHARE, "stopped": search.why_stopped,
                                 "tries": search.rounds}
    return record
