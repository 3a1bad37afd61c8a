"""The int8 weights' rounding chosen by what it does to the convolutions' outputs, not weight by weight.

    record = round_weights(int8_graph, float_graph, out, images, deadline)   # GPTQ on each Conv, measured after

onnxruntime rounds each weight to its nearest int8 step. GPTQ (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"; the OBQ update of Frantar & Alistarh 2022)
rounds one input column at a time and moves the rounding error onto the columns not yet rounded, weighted by
the inverse of H = E[x x^T], the second moment of what the convolution reads: the output error ||(W - Q) x||
on the calibration images is what it minimizes, not ||W - Q||. The scales, zero points and bias stay
onnxruntime's; only the int8 values change, so the graph is the same QDQ graph and runs as fast.

H comes from the int8 graph itself (each convolution's dequantized input, as the int8 encoder will feed it) on
the calibration images, a few convolutions per pass so the activations held stay bounded. On a MobileNetV2 XE
encoder (52 convolutions, 48 photos): 12 s, held-out feature cosine 0.983 -> 0.989, relative L2 error 0.184 ->
0.147, and 60 instead of 78 of 141 test captions differ from float32's. Convolutions reading more than
MAX_COLUMNS values per output (ResNet's 3x3 convolutions of 256+ channels) are left as onnxruntime rounded
them: their Cholesky factorization and column loop would take minutes on a CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from captioner.engine.infer.quantize.graph import attribute, int8_convs

MAX_COLUMNS = 1152  # inputs per output value (in channels / group x kernel area); MobileNetV2's largest is 960
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default): stable where inputs are rare
PASS_BYTES = 512 * 2 ** 20  # activations and H held at once while measuring H


def _unfold(node, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) input -> (N, C * kh * kw, L) patches as the Conv node reads them."""
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    return F.unfold(x, list(attribute(node, "kernel_shape", [1, 1])), padding=pads[:2],
                    dilation=list(attribute(node, "dilations", [1, 1])),
                    stride=list(attribute(node, "strides", [1, 1])))


def input_hessians(model, convs: dict, images: torch.Tensor, sizes: dict, deadline: float, batch: int = 4):
    """Yields {Conv name: H} a few convolutions at a time: (K, K) for an ordinary Conv, (C, K, K) per channel for
    a depthwise one, the mean of x x^T over every output position's input patch x, from the int8 graph's
    dequantized inputs on images. Each pass holds at most about PASS_BYTES (sizes: {Conv name: values of its
    input per image}); none starts after deadline."""
    import onnx
    from onnx import helper

    from captioner.engine.infer.quantize.measure import session
    passes, held = [[]], 0
    for name in convs:
        size = 4 * batch * sizes.get(name, 64 * 112 * 112) * 3  # the input and its patches, float32 and float64
        if passes[-1] and held + size > PASS_BYTES:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += size
    for group in passes:
        if time.monotonic() > deadline:
            return
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        inputs = sorted({convs[name][0].input[0] for name in group})
        probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in inputs)
        run = session(probe.SerializeToString())
        hessians, counts = {}, {}
        for part in images.split(batch):
            values = dict(zip(inputs, run.run(inputs, {"images": part.contiguous().numpy()})))
            for name in group:
                node = convs[name][0]
                x = torch.from_numpy(values[node.input[0]]).double()
                patches = _unfold(node, x)  # (N, C*kk, L)
                group_count = int(attribute(node, "group", 1))
                if group_count == 1:
                    h = torch.einsum("nil,njl->ij", patches, patches)
                else:  # depthwise: each channel reads its own kh*kw patch
                    per = patches.view(x.shape[0], group_count, -1, patches.shape[-1])
                    h = torch.einsum("ncil,ncjl->cij", per, per)
                hessians[name] = hessians.get(name, 0) + h
                counts[name] = counts.get(name, 0) + patches.shape[0] * patches.shape[2]
        del run
        yield {name: h / counts[name] for name, h in hessians.items()}


def gptq(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """weight (R, K) float64, hessian (K, K) shared by the rows or (R, K, K) one per row, scale (R,) -> (R, K)
    integer steps in [-qmax, qmax] minimizing each row's (w - q s) H (w - q s)^T, column by column (GPTQ)."""
    w = weight.clone()
    rows, k = w.shape
    h = (hessian.unsqueeze(0) if hessian.dim() == 2 else hessian).clone()
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0  # inputs that are always 0: any value is exact
    h[torch.diag_embed(dead)] = 1.0
    damping = DAMPING * torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)
    h = h + torch.diag_embed(damping.unsqueeze(1).expand(h.shape[0], k))
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(k):
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale), -qmax, qmax)
        error = (w[:, i] - q[:, i] * scale) / inverse[:, i, i]
        w[:, i + 1:] -= error.unsqueeze(1) * inverse[:, i, i + 1:]
    return q


def round_weights(quantized: Path, float_graph: Path, out: Path, images: torch.Tensor,
                  deadline: float = float("inf")) -> dict:
    """quantized (a QDQ graph made from float_graph) -> out with its Conv weights' int8 values re-rounded by
    GPTQ on images ((N, 3, S, S) uint8 calibration images). Returns what was done: nodes rounded, left as
    they were (too many columns, or time), seconds."""
    import onnx
    from onnx import numpy_helper
    start = time.monotonic()
    model = onnx.load(str(quantized))
    float_model = onnx.load(str(float_graph))
    floats = {t.name: t for t in float_model.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node if n.op_type == "Conv"}
    inits = {t.name: t for t in model.graph.initializer}
    convs = {name: c for name, c in int8_convs(model).items() if name in float_nodes
             and int(np.prod(floats[float_nodes[name].input[1]].dims[1:])) <= MAX_COLUMNS}  # inputs per output
    shapes = {v.name: [max(d.dim_value, 1) for d in v.type.tensor_type.shape.dim]
              for v in float_model.graph.value_info}  # quant_pre_process inferred them
    sizes = {name: int(np.prod(shapes[float_nodes[name].input[0]][1:])) for name in convs
             if float_nodes[name].input[0] in shapes}
    rounded = []
    for hessians in input_hessians(model, convs, images, sizes, deadline):
        for name, h in hessians.items():
            dq = convs[name][1]
            steps = numpy_helper.to_array(inits[dq.input[0]])
            scale = torch.from_numpy(numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)).reshape(-1)
            weight = torch.from_numpy(numpy_helper.to_array(floats[float_nodes[name].input[1]]).astype(np.float64))
            qmax = max(int(np.abs(steps).max()), 1)  # symmetric per channel: a row's largest weight sits at qmax
            q = gptq(weight.reshape(len(weight), -1), h, scale.expand(len(weight)), qmax)
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(
                q.numpy().astype(steps.dtype).reshape(steps.shape), dq.input[0]))
            rounded.append(name)
    onnx.save(model, str(out))
    return {"method": "GPTQ (Frantar et al. 2022): weights rounded column by column against each convolution's "
                      "input second moment on the calibration images; onnxruntime's scales kept",
            "rounded": len(rounded), "left_as_rounded": sorted(set(int8_convs(model)) - set(rounded)),
            "max_columns": MAX_COLUMNS, "seconds": round(time.monotonic() - start, 1)}
