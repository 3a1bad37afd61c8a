"""How far int8 encoder features are from float32's: the numbers the calibration choice, the sensitivity pass and
quantization.json are stated in.

    probe = FeatureProbe(float_encoder, images)     # float32 features of images, computed once
    probe.error(int8_encoder)                       # {"cosine_mean", "cosine_min", "relative_error", "images"}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def session(path: str | Path | bytes):
    """A one-thread CPU onnxruntime session of path (or a serialized model), logging only errors (the
    measurements run many)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # small batches: threads cost more than they give, and the CPU is shared
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_encoder(path: str | Path | bytes, images: torch.Tensor, batch: int = 8) -> np.ndarray:
    """(N, C, H, W) float64 features of encoder.onnx at path (or serialized) on images ((N, 3, S, S) uint8)."""
    encoder = session(path)
    return np.concatenate([encoder.run(None, {"images": part.contiguous().numpy()})[0]
                           for part in images.split(batch)]).astype(np.float64)


def compare(ref: np.ndarray, q: np.ndarray) -> dict:
    """int8 features q against float32 features ref, both (N, ...): per-image cosine similarity (mean, min) of
    the flattened features and the relative L2 error ||q - ref|| / ||ref|| over all of them."""
    ref, q = ref.reshape(len(ref), -1), q.reshape(len(q), -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(q, axis=1)
    cosine = (ref * q).sum(axis=1) / np.maximum(norms, 1e-30)
    relative = np.linalg.norm(q - ref) / max(np.linalg.norm(ref), 1e-30)
    return {"images": len(ref), "cosine_mean": round(float(cosine.mean()), 6),
            "cosine_min": round(float(cosine.min()), 6), "relative_error": round(float(relative), 6)}


class FeatureProbe:
    """float32 encoder.onnx's features of a fixed set of images, to compare int8 candidates against."""

    def __init__(self, float_encoder: str | Path, images: torch.Tensor):
        self.images = images
        self.reference = run_encoder(float_encoder, images)

    def error(self, int8_encoder: str | Path) -> dict:
        return compare(self.reference, run_encoder(int8_encoder, self.images))
