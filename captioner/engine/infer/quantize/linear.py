"""The encoder's linear layers in int8: what the convolution pass leaves in float.

    record = quantize_linear(encoder, out, probe, budget, probe.error(encoder))  # out: linear layers int8 or a copy

A ViT or an open_clip tower does nearly all its work in MatMul/Gemm nodes with constant weights (the attention's
projections, the MLPs), and so do ConvNeXt's MLPs (timm writes them as Linear layers). Static QDQ quantization of
the convolutions alone left them float: a ViT-S/16's "int8" encoder ran no faster than float32 (57.7 ms against
52.6 ms for 8 images at one thread), ConvNeXt-T's 1.1x. Here they are quantized dynamically, as the decoder's are
and as transformers' CPU int8 usually is: weights int8 per output channel, activations quantized per call with
their own range (no calibration: a transformer's activations carry outliers a fixed range clips). ViT-S/16 then
runs 2.3x float32, ConvNeXt-T 2.3x (random weights). The attention's activation-by-activation products (queries
by keys) stay float.

Kept, like every other step, only on measurement: when the features with them int8 still meet the budget (mean
cosine similarity to float32's on the held-out calibration images); else the graph is left as it was and the
record says why.
"""
from __future__ import annotations

import shutil
from pathlib import Path

LINEAR_OPS = ("MatMul", "Gemm")


def linear_nodes(model) -> list[str]:
    """Names of model's MatMul/Gemm nodes whose second input (the weight) is a constant: the linear layers."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1
            and n.input[1] in constants]


def quantize_linear(encoder: Path, out: Path, probe, budget: float, before: dict) -> dict:
    """out (another file than encoder): encoder with its linear layers dynamically int8 (per-channel 7-bit weights,
    calibrate.py says why) when its features on probe's images then meet budget, else a copy of encoder (before:
    probe.error(encoder), already measured). The candidate is written beside encoder (a scratch folder). Returns
    the record (quantization.json's encoder.linear_layers) with the error measured, applied or not."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    names = linear_nodes(onnx.load(str(encoder)))
    if not names:
        shutil.copyfile(encoder, out)
        return {"nodes": 0, "applied": False, "why": "no MatMul or Gemm with constant weights"}
    candidate = Path(encoder).with_name("encoder-linear.onnx")
    quantize_dynamic(str(encoder), str(candidate), op_types_to_quantize=list(LINEAR_OPS), nodes_to_quantize=names,
                     weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    after = probe.error(candidate)
    applied = after["cosine_mean"] >= budget
    shutil.copyfile(candidate if applied else encoder, out)
    candidate.unlink()
    why = (f"with the {len(names)} linear layers int8 the features reach cosine {after['cosine_mean']:.4f}, "
           + (f"meeting the budget {budget:g}" if applied else f"under the budget {budget:g}: kept in float"))
    return {"method": "dynamic", "op_types": list(LINEAR_OPS), "per_channel": True, "weight_type": "int8",
            "reduce_range": True, "nodes": len(names), "applied": applied,
            "cosine_before": before["cosine_mean"], "cosine_after": after["cosine_mean"], "why": why,
            "error": after if applied else before}
