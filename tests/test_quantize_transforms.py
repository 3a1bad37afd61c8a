"""Offset centering before int8 (engine/infer/quantize/transforms.py): exact in float, only where exact, and
quantization.json says whether it was applied and what it measured."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notices

from captioner.engine.infer.quantize import transforms  # noqa: E402
from captioner.engine.infer.quantize.encoder import quantize_encoder_measured  # noqa: E402
from captioner.engine.infer.quantize.measure import run_encoder  # noqa: E402
from captioner.engine.infer.quantize.record import quantization_record  # noqa: E402


class Bottleneck(nn.Module):
    """MobileNetV2 in miniature: linear bottleneck outputs with large constant offsets, a residual sum of two of
    them, read by 1x1 convolutions (exact to center) or, with padded_reader, also by a padded 3x3 (not exact)."""

    def __init__(self, padded_reader: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.project = nn.Conv2d(8, 4, 1)
        self.expand, self.project2 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1)
        self.read = nn.Conv2d(4, 8, 3, padding=1) if padded_reader else nn.Conv2d(4, 8, 1)
        self.last = nn.Conv2d(8, 6, 3, padding=1)
        with torch.no_grad():  # the offsets that make one per-tensor range too coarse
            self.project.bias.copy_(torch.tensor([20.0, -15.0, 8.0, -30.0]))
            self.project2.bias.copy_(torch.tensor([-5.0, 12.0, 3.0, 25.0]))

    def forward(self, images):
        x = torch.clamp(self.stem(images.float() / 255), 0, 6)
        p = self.project(x)
        r = p + self.project2(torch.clamp(self.expand(p), 0, 6))
        return self.last(torch.clamp(self.read(r), 0, 6))


def _export(path, padded_reader=False):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.onnx.export(Bottleneck(padded_reader).eval(), (images,), str(path), input_names=["images"],
                      output_names=["features"], dynamic_axes={"images": {0: "b"}, "features": {0: "b"}},
                      opset_version=17, dynamo=False)
    return path


def _images(count=12):
    torch.manual_seed(1)
    return torch.randint(0, 256, (count, 3, 16, 16), dtype=torch.uint8)


def test_centering_is_exact_in_float_and_removes_the_offsets(tmp_path):
    source = _export(tmp_path / "float.onnx")
    model = onnx.load(str(source))
    tensors = transforms.candidates(model)
    assert len(tensors) == 2  # project and project2 (through the residual Add); never the graph output
    means = transforms.channel_centers(source, tensors, _images())
    assert np.abs(means[tensors[0]]).max() > 10
    assert transforms.center_offsets(model, means) == 2
    onnx.save(model, str(tmp_path / "centered.onnx"))
    before, after = run_encoder(source, _images()), run_encoder(tmp_path / "centered.onnx", _images())
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    centered = transforms.channel_centers(tmp_path / "centered.onnx", tensors, _images())
    assert all(np.abs(centered[t]).max() < 1e-3 for t in tensors)


def test_a_padded_reader_is_never_shifted(tmp_path):
    """A padded 3x3 convolution reads the zero border too, so its bias cannot absorb a shift exactly: the
    residual group it reads (project, project2) is left as it is."""
    model = onnx.load(str(_export(tmp_path / "float.onnx", padded_reader=True)))
    assert transforms.candidates(model) == []


def test_quantization_record_states_the_transform_and_both_measurements(tmp_path):
    source = _export(tmp_path / "float.onnx")
    work = tmp_path / "work"
    work.mkdir()
    images = _images()
    plan = quantize_encoder_measured(source, tmp_path / "int8.onnx", images, work, budget=0.0, time_limit=60)
    (record,) = quantization_record(plan, images, "random")["encoder"]["transforms"]
    assert record["name"] == "offset_centering" and record["nodes"] == 2
    assert record["applied"] == (record["cosine_with"] > record["cosine_without"])
    assert record["cosine_with"] > record["cosine_without"]  # offsets of 8-30 on a spread of ~1: centering helps
