"""Static int8 of the encoder's convolutions with a calibration method chosen by measurement.

    fit, held = split_held_out(images)                       # calibrate on fit, measure on held
    choice = choose_method(prepared, workdir, fit, probe)    # MinMax, Percentile, Entropy: each measured
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

log = logging.getLogger("captioner")

METHODS = ("MinMax", "Percentile", "Entropy")  # onnxruntime.quantization.CalibrationMethod names, all tried
HELD_OUT_EVERY = 4  # every 4th calibration image is held out: the methods are compared on images they never saw
# Percentile's clipping point: 99.999% of the calibration activations keep their exact range (onnxruntime's
# default); Entropy uses onnxruntime's defaults (128 quantized bins). Note: onnxruntime (1.32) histograms Entropy
# into 128 bins too and quantize_static has no option to change that, so its threshold search has a single
# candidate, the whole range: Entropy measures exactly as MinMax (pretrained MobileNetV2: 0.959751 both).
PERCENTILE = 99.999
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
    extra = {"CalibPercentile": PERCENTILE} if method == "Percentile" else {}
    cached = {"calibration_cache_path": str(cache)} if cache is not None and _supports_cache() else {}
    # The histogram methods stack every batch's activations: they need batches of one shape, so one image each.
    reader = ImageReader(fit, batch=8 if method == "MinMax" else 1)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        _quantize_static(prepared, out, reader, method, excluded, extra, cached)


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
