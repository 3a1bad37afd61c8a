"""Dynamic int8 whose result does not depend on the batch: each row of a matrix product's input gets its own range.

    quantize_dynamic_rowwise(source, target, nodes=None)   # onnxruntime's quantize_dynamic, then per-row ranges

onnxruntime's quantize_dynamic quantizes a MatMul's input with DynamicQuantizeLinear: one uint8 range for the
whole tensor, so for every image (and every beam) in the batch together. A caption then depended on which other
images shared its batch: an int8 demo model wrote 71 of 2000 captions differently at --batch-size 1 and 64, and
the standalone example (its own batches) disagreed with `captioner caption` on 2 of 96 images. Here every row (the
last axis: one image's, beam's or token's vector) is quantized on its own, symmetrically: scale max|x| / 127
around the fixed zero point 128. The zero point stays one number because onnxruntime's CPU MatMulInteger takes a
scalar zero point only; the per-row scale multiplies the product afterwards (_scale_after_product).

What it costs: a few small nodes per quantized input. A MobileNetV2 recipe model captioning 48 Flickr8k photos at
one thread (beam 3, interleaved rounds): 1.605x ONNX Runtime float32 against 1.633x with per-tensor ranges; 46 of
the 48 captions are the same.
"""
from __future__ import annotations

from pathlib import Path

ZERO_POINT = 128
LEVELS = 127  # |x| / scale <= 127: uint8 1..255 around 128, so a u8 x 7-bit s8 pair sum cannot saturate either
# A row of zeros gets this scale instead of 0 (0 / 0): every value quantizes to the zero point, as it should.
TINY = 1e-30
MIN_COLUMNS = 16
# quantization.json's words for it
ROWWISE = ("uint8 per row (last axis), symmetric: scale max|row| / 127 around zero point 128, computed per call; "
           "a row's result does not depend on the other rows of its batch")


def quantize_dynamic_rowwise(source: str | Path, target: str | Path, nodes: list[str] | None = None) -> int:
    """target: source's MatMul/Gemm nodes with constant weights in dynamic int8 (nodes: the names, chosen among
    wide_products(source) by the caller; None: all of those), per-channel 7-bit weights (calibrate.py says why),
    each input row quantized with its own range. Returns how many inputs were made per-row."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    # linear.py's sensitivity pass calls this once per try with names it took from wide_products already
    chosen = nodes if nodes is not None else wide_products(onnx.load(str(source)))
    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm"],
                     # quantize_dynamic rewrites a Gemm as a MatMul named NAME_MatMul before it picks the nodes
                     nodes_to_quantize=[name for n in chosen for name in (n, f"{n}_MatMul")],
                     weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    model = onnx.load(str(target))
    count = make_rowwise(model)
    onnx.save(model, str(target))
    return count


def wide_products(model) -> list[str]:
    """The names of model's MatMul/Gemm nodes with a constant weight of at least MIN_COLUMNS output columns.
    A narrower one (the attention's score, a (A, 1) weight applied to every grid cell) gains nothing from int8:
    quantizing its (B, cells, A) input row by row passes over the whole grid for a product of one column (decoder
    step, 24 rows, an earlier per-row version: 1.26 ms with it int8 against 0.80 ms with it float)."""
    from onnx import numpy_helper
    from captioner.engine.infer.quantize.graph import attribute
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes |= {n.output[0]: tuple(numpy_helper.to_array(n.attribute[0].t).shape) for n in model.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    wide = []
    for node in model.graph.node:
        shape = shapes.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        if shape is None or len(shape) != 2:
            continue
        transposed = node.op_type == "Gemm" and attribute(node, "transB", 0)
        if shape[0 if transposed else 1] >= MIN_COLUMNS:
            wide.append(node.name)
    return wide


def make_rowwise(model) -> int:
    """Replace model's DynamicQuantizeLinear nodes, in place, by per-row symmetric quantization with the same three
    outputs (uint8 values, scale, zero point). Returns how many were replaced."""
    from onnx import TensorProto, helper
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, row_scales = [], set()
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        x, (values, scale, zero) = node.input[0], node.output
        row_scales.add(scale)
        name = (node.name or values) + "_rowwise"

        def const(suffix, data, dtype=TensorProto.FLOAT, out=None, dims=()):
            out = out or f"{name}_{suffix}"
            nodes.append(helper.make_node("Constant", [], [out], name=out,
                                          value=helper.make_tensor(out, dtype, list(dims), data)))
            return out

        def op(op_type, inputs, suffix=None, out=None, **attributes):
            out = out or f"{name}_{suffix}"
            nodes.append(helper.make_node(op_type, inputs, [out], name=f"{name}_{op_type}_{len(nodes)}",
                                          **attributes))
            return out

        # Each row scaled to [-127, 127] by one broadcast Mul, then QuantizeLinear with a fixed scale of 1 rounds,
        # shifts by 128 and casts in one pass: 7 nodes, few enough for the step's small rows.
        magnitude = op("Abs", [x], "abs")
        if opset >= 18:  # ReduceMax's axes moved from an attribute to an input
            largest = op("ReduceMax", [magnitude, const("axes", [-1], TensorProto.INT64, dims=[1])], "max",
                         keepdims=1)
        else:
            largest = op("ReduceMax", [magnitude], "max", axes=[-1], keepdims=1)
        largest = op("Max", [largest, const("tiny", [TINY])], "max_safe")
        to_levels = op("Div", [const("levels", [float(LEVELS)]), largest], "to_levels")
        op("QuantizeLinear", [op("Mul", [x, to_levels], "scaled"), const("unit", [1.0]),
                              const("zero", [ZERO_POINT], TensorProto.UINT8, out=zero)], out=values)
        op("Div", [largest, f"{name}_levels"], out=scale)
    if not row_scales:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _scale_after_product(model, row_scales)
    return len(row_scales)


def _scale_after_product(model, row_scales: set[str]) -> None:
    """quantize_dynamic writes product = Cast(MatMulInteger(...)) * (input scale * weight scale), and onnxruntime
    fuses that into MatMulIntegerToFloat, whose input scale must be one number: a per-row scale there is misread
    (the step's log-probabilities 10x further from float32's). So the input scale in that Mul becomes 1, and a
    Mul by the per-row scale follows the product, before any bias is added."""
    from onnx import TensorProto, helper
    one = "rowwise_one"
    # {input scale * weight scale Mul's output: the row scale it read}
    combined = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Mul" and n.input[0] in row_scales}
    nodes = [helper.make_node("Constant", [], [one], name=one,
                              value=helper.make_tensor(one, TensorProto.FLOAT, [], [1.0]))]
    for node in model.graph.node:
        nodes.append(node)
        if node.output[0] in combined:
            node.input[0] = one
        elif node.op_type == "Mul" and any(i in combined for i in node.input):
            row_scale = combined[next(i for i in node.input if i in combined)]
            out = node.output[0]
            node.output[0] = f"{out}_before_row_scale"
            nodes.append(helper.make_node("Mul", [node.output[0], row_scale], [out], name=f"{node.name}_row_scale"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
