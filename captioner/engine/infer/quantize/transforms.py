"""Float graph rewrites before int8, exact in float, that make activations easier to quantize per tensor.

    shifted = center_offsets(model, means)   # model: onnx ModelProto after quant_pre_process; returns node count

Offset absorption: MobileNetV2's linear-bottleneck outputs (projection convolutions without an activation, and
the residual sums of them) carry large constant per-channel offsets; one uint8 range per tensor must then cover
the offsets of all channels, not their spread, and the 1x1 expand convolutions reading them amplify the rounding.
A convolution is linear, so the producer's bias can subtract each channel's calibration mean m (its output is
x - m) and every 1x1, unpadded consumer convolution adds W.m back to its bias: conv(x) = conv(x - m) + W.m,
exact in float. Residual Adds of shifted tensors carry the sum of their inputs' shifts on to their consumers.
A tensor is shifted only when every tensor downstream of it through Adds is read by convolutions that can
absorb it exactly (1x1, no padding) or by further Adds; the graph's outputs are never shifted.
"""
from __future__ import annotations

import numpy as np

from captioner.engine.infer.quantize.graph import attribute


def _absorbs(node, inits) -> bool:
    """A Conv that can add its input's shift to its bias exactly: 1x1 kernel, no padding, weight an initializer."""
    if node.op_type != "Conv" or node.input[1] not in inits:
        return False
    w = inits[node.input[1]]
    return (w.ndim == 4 and w.shape[2:] == (1, 1) and not any(attribute(node, "pads", [0]))
            and attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID"))


def candidates(model) -> list[str]:
    """Outputs of Conv nodes (an initializer weight) whose whole Add-connected downstream is read only by
    absorbing convolutions and Adds (so shifting them is exact), in graph order."""
    from onnx import numpy_helper
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def exact(tensor: str, seen: set) -> bool:
        if tensor in outputs or tensor in seen or not readers.get(tensor):
            return False
        seen.add(tensor)
        for reader in readers[tensor]:
            if reader.op_type == "Add":
                if not exact(reader.output[0], seen):
                    return False
            elif not _absorbs(reader, inits):
                return False
        return True

    return [node.output[0] for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) > 2 and node.input[1] in inits and node.input[2] in inits
            and exact(node.output[0], set())]


def center_offsets(model, means: dict[str, np.ndarray]) -> int:
    """Rewrites model in place: each Conv output named in means ((C,) per-channel calibration mean) loses it
    through its bias, and the convolutions downstream (through Adds) add W.shift back. Returns the number of
    producer convolutions shifted. means' keys must come from candidates(model)."""
    from onnx import numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t).copy() for name, t in inits.items()}
    shift: dict[str, np.ndarray] = {}
    for node in model.graph.node:  # topological order: producers before readers
        if node.op_type == "Conv" and node.output[0] in means:
            mean = np.asarray(means[node.output[0]], dtype=np.float64)
            arrays[node.input[2]] = (arrays[node.input[2]].astype(np.float64) - mean).astype(np.float32)
            shift[node.output[0]] = mean
        elif node.op_type == "Add" and any(i in shift for i in node.input):
            shift[node.output[0]] = sum(shift.get(i, 0.0) for i in node.input)
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] in shift:
            w = arrays[node.input[1]].astype(np.float64)[:, :, 0, 0]  # (out, in / group)
            group = int(attribute(node, "group", 1))
            s = shift[node.input[0]].reshape(group, -1)  # (group, in / group)
            per_out = w.shape[0] // group
            folded = np.concatenate([w[g * per_out:(g + 1) * per_out] @ s[g] for g in range(group)])
            if len(node.input) > 2 and node.input[2] in arrays:
                arrays[node.input[2]] = (arrays[node.input[2]].astype(np.float64) + folded).astype(np.float32)
            else:
                name = node.name + "_offset_bias"
                arrays[name] = folded.astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(arrays[name], name))
                inits[name] = model.graph.initializer[-1]
                if len(node.input) == 2:
                    node.input.append(name)
                else:
                    node.input[2] = name
    for name, t in inits.items():
        t.CopyFrom(numpy_helper.from_array(arrays[name], name))
    return len(means)


def channel_centers(model_path, tensors: list[str], images, center: str = "mean") -> dict[str, np.ndarray]:
    """{tensor: (C,) center over images, rows and columns} of the float graph's intermediate tensors: "mean",
    or "midrange" ((min + max) / 2: the shift that makes the channel's range smallest)."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(model_path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums, counts = {t: 0.0 for t in tensors}, {t: 0 for t in tensors}
    lows, highs = {t: np.inf for t in tensors}, {t: -np.inf for t in tensors}
    for part in images.split(8):
        for t, v in zip(tensors, session.run(tensors, {"images": part.contiguous().numpy()})):
            v = v.astype(np.float64)
            sums[t] = sums[t] + v.sum(axis=(0, 2, 3))
            counts[t] += v.shape[0] * v.shape[2] * v.shape[3]
            lows[t], highs[t] = np.minimum(lows[t], v.min(axis=(0, 2, 3))), np.maximum(highs[t], v.max(axis=(0, 2, 3)))
    if center == "midrange":
        return {t: (lows[t] + highs[t]) / 2 for t in tensors}
    return {t: sums[t] / counts[t] for t in tensors}


def choose_centering(prepared, work, fit, probe, quantize) -> tuple:
    """(float graph to quantize, record): prepared, or its offset-centered copy (means of fit's activations)
    when the centered copy's int8 features (quantize(graph, out): one MinMax quantization each) are closer to
    float32's on probe's held-out images. The record states the transform, its node count and both cosines."""
    import onnx
    model = onnx.load(str(prepared))
    tensors = candidates(model)
    record = {"name": "offset_centering", "nodes": len(tensors), "applied": False,
              "what": "per-channel calibration means of the linear-bottleneck outputs moved from the producing "
                      "convolutions' biases into the 1x1 convolutions reading them (exact in float)"}
    if not tensors:
        return prepared, {**record, "why": "no convolution output the transform applies to"}
    center_offsets(model, channel_centers(prepared, tensors, fit))
    centered = work / "encoder.centered.onnx"
    onnx.save(model, str(centered))
    errors = {}
    for name, graph in (("without", prepared), ("with", centered)):
        quantize(graph, work / f"encoder-centering-{name}.onnx")
        errors[name] = probe.error(work / f"encoder-centering-{name}.onnx")
    applied = errors["with"]["cosine_mean"] > errors["without"]["cosine_mean"]
    record.update(applied=applied, cosine_without=errors["without"]["cosine_mean"],
                  cosine_with=errors["with"]["cosine_mean"], measured_with="MinMax, every convolution int8",
                  chosen_by="the higher mean cosine of int8 to float32 features on the held-out calibration images")
    return (centered if applied else prepared), record

