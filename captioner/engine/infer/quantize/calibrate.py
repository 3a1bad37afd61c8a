"""Static int8 of the encoder's convolutions with a calibration method chosen by measurement.

    fit, held = split_held_out(images)                       # calibrate on fit, measure on held
    choice = choose_method(prepared, workdir, fit, probe)    # MinMax, Percentiles, Entropy: each measured
    quantize_encoder(prepared, out, fit, choice.method, excluded, choice.cache)   # again, other exclusions

Each method's activation ranges are computed once and reused (onnxruntime's calibration cache, where the
installed onnxruntime has one) when the sensitivity pass re-quantizes with other nodes kept in float.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captioner.engine.infer.quantize.graph import attribute, producers

log = logging.getLogger("captioner")

# The calibration candidates, each measured: {name: (onnxruntime.quantization.CalibrationMethod name, the
# percentile it keeps or None)}. Percentile clips at 99.999% of the calibration activations (onnxruntime's
# default) and at 99.99%: MobileNetV2's linear-bottleneck outputs and residual sums have long tails, and their
# quantization error is spread over ~20 tensors, no single one worth keeping in float (pretrained MobileNetV2,
# first depthwise conv in float: held-out feature cosine 0.976 at 99.999%, 0.982 at 99.99%, 0.968 at 99.9%).
# Entropy uses onnxruntime's defaults (128 quantized bins). Note: onnxruntime (1.32) histograms Entropy into 128
# bins too and quantize_static has no option to change that, so its threshold search has a single candidate,
# the whole range: Entropy measures exactly as MinMax (pretrained MobileNetV2: 0.959751 both).
METHODS = {"MinMax": ("MinMax", None), "Percentile": ("Percentile", 99.999),
           "Percentile-99.99": ("Percentile", 99.99), "Entropy": ("Entropy", None)}
HELD_OUT_EVERY = 4  # every 4th calibration image is held out: the methods are compared on images they never saw
# Conv, and the activations after it: with Clip (ReLU6) and Relu quantized too, onnxruntime folds them into the
# convolution's output range ([0, 6], not the pre-activation's [-16, 20]), one rounding instead of two: on a
# pretrained MobileNetV2 the int8 features' cosine to float32's goes 0.899 -> 0.919 (Percentile).
OP_TYPES = ["Conv", "Clip", "Relu"]


class ImageReader:
    """onnxruntime's CalibrationDataReader over (N, 3, S, S) uint8 images, a few at a time."""

    def __init__(self, images: torch.Tensor, batch: int = 8):
        self.batches = iter(images.split(batch))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch.contiguous().numpy()}


def split_held_out(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held): every HELD_OUT_EVERY-th image held out to measure on, the rest to calibrate on; with under
    2 images both are the same (held is then not held out: quantization.json says so)."""
    if len(images) < 2:
        return images, images
    held = torch.zeros(len(images), dtype=torch.bool)
    held[HELD_OUT_EVERY - 1::HELD_OUT_EVERY] = True
    if not held.any():
        held[-1] = True
    return images[~held], images[held]


def _supports_cache() -> bool:
    from onnxruntime.quantization import quantize_static
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_encoder(prepared: Path, out: Path, fit: torch.Tensor, method: str, excluded: list[str],
                     cache: Path | None = None) -> None:
    """prepared (a float32 encoder.onnx after quant_pre_process) -> out: QDQ int8 of its Conv nodes but
    excluded, per-channel 7-bit weights, uint8 activations with method's ranges on fit's images (read from
    cache when it exists and onnxruntime can, else computed and written there)."""
    calibrator, percentile = METHODS[method]
    extra = {"CalibPercentile": percentile} if percentile is not None else {}
    cached = {"calibration_cache_path": str(cache)} if cache is not None and _supports_cache() else {}
    # The histogram methods stack every batch's activations: they need batches of one shape, so one image each.
    reader = ImageReader(fit, batch=8 if calibrator == "MinMax" else 1)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        _quantize_static(prepared, out, reader, calibrator, excluded, extra, cached)
    if excluded:
        keep_float(out, excluded)


def keep_float(path: Path, excluded: list[str]) -> int:
    """Rewrites the QDQ graph at path so onnxruntime runs the excluded Conv nodes in float, as asked; returns
    how many inputs it changed.

    onnxruntime's WeightBiasQuantization optimizer (level 1, on by default since ~1.20) quantizes a float Conv
    whose input comes from a DequantizeLinear with a scalar scale: its weights become per-tensor symmetric int8.
    A node kept in float because it is sensitive then runs in the worst int8 there is: MobileNetV2's first
    depthwise convolution kept in float behind an int8 one measured 0.61 feature cosine instead of 0.97. The
    optimizer only matches a scalar input scale, so each such node reads its own copy of the DequantizeLinear
    with the same scale and zero point repeated per channel (axis 1): the same values, and no match."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    made_by = producers(graph)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    nodes, changed = list(graph.node), 0
    for node in [n for n in nodes if n.op_type == "Conv" and n.name in set(excluded)]:
        dq = made_by.get(node.input[0])
        weight = inits.get(node.input[1])
        if (dq is None or dq.op_type != "DequantizeLinear" or weight is None
                or dq.input[1] not in inits or numpy_helper.to_array(inits[dq.input[1]]).size != 1):
            continue
        channels = shapes.get(dq.output[0], [0, 0])[1] or (weight.dims[1] * attribute(node, "group", 1))
        name = node.name + "_float_input"
        scale = numpy_helper.to_array(inits[dq.input[1]]).reshape(1)
        graph.initializer.append(numpy_helper.from_array(np.repeat(scale, channels), name + "_scale"))
        params = [name + "_scale"]
        if len(dq.input) > 2 and dq.input[2] in inits:
            zero = numpy_helper.to_array(inits[dq.input[2]]).reshape(1)
            graph.initializer.append(numpy_helper.from_array(np.repeat(zero, channels), name + "_zero_point"))
            params.append(name + "_zero_point")
        copy = helper.make_node("DequantizeLinear", [dq.input[0]] + params, [name], name=name + "_DQ", axis=1)
        nodes.insert(nodes.index(node), copy)
        node.input[0] = name
        changed += 1
    if changed:
        graph.ClearField("node")
        graph.node.extend(nodes)
        onnx.save(model, str(path))
    return changed


def _quantize_static(prepared, out, reader, method, excluded, extra, cached) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    quantize_static(str(prepared), str(out), reader,
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(excluded),
                    # 7-bit weights: x86 CPUs without VNNI (AVX2, AVX-512F) multiply uint8 by int8 in pairs
                    # summed into int16 (VPMADDUBSW), which saturates with full 8-bit weights: MobileNetV2's
                    # int8 features then correlate 0.6 with float32's, and real-photo CIDEr-D drops 15%.
                    reduce_range=True, calibrate_method=getattr(CalibrationMethod, method),
                    extra_options=extra, **cached)


@dataclass
class MethodChoice:
    method: str
    cache: Path | None
    errors: dict = field(default_factory=dict)  # {method: compare() of its int8 features on the held-out images}


def choose_method(prepared: Path, work: Path, fit: torch.Tensor, probe, excluded: list[str],
                  deadline: float = float("inf")) -> MethodChoice:
    """Quantizes prepared with each of METHODS (calibrated on fit, excluded kept in float) and keeps the one
    whose features on probe's held-out images are closest to float32's (highest mean cosine similarity). The
    methods after the first are skipped once time.monotonic() passes deadline (recorded as skipped)."""
    errors, caches = {}, {}
    for method in METHODS:
        if errors and time.monotonic() > deadline:
            errors[method] = {"skipped": "the time allowed for quantization ran out"}
            continue
        caches[method] = work / f"ranges-{method}.json"
        candidate = work / f"encoder-{method}.onnx"
        quantize_encoder(prepared, candidate, fit, method, excluded, caches[method])
        errors[method] = probe.error(candidate)
        log.debug("int8 calibration %s: %s", method, errors[method])
    measured = [m for m in METHODS if "cosine_mean" in errors[m]]
    best = max(measured, key=lambda m: (errors[m]["cosine_mean"], -errors[m]["relative_error"]))
    return MethodChoice(best, caches[best] if caches[best].is_file() else None, errors)
