"""Reading ONNX graphs, shared by the int8 steps: a node's attribute, which node makes each tensor, the Conv
nodes whose weights are int8, and the scales those read.

    attribute(node, "group", 1)
    producers(model.graph)["conv1_output"]            # the node that writes it
    for name, (conv, weight_dq) in int8_convs(model).items(): ...
    scale, zero, w_int8, w_scales = qdq_inputs(model)[name]
"""
from __future__ import annotations


def attribute(node, name: str, default):
    """node's attribute name as a Python value, or default where the node has none."""
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def producers(graph) -> dict:
    """{tensor name: the node that writes it} of graph's nodes."""
    return {out: node for node in graph.node for out in node.output}


def initializer_arrays(model) -> dict:
    """{initializer name: its numpy array}."""
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def int8_convs(model) -> dict:
    """{Conv name: (node, weight DequantizeLinear)} of a QDQ graph's Conv nodes whose weights are int8
    initializers with zero points of 0 (onnxruntime's symmetric per-channel weights), in graph order."""
    from onnx import numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    made_by = producers(model.graph)
    found = {}
    for node in model.graph.node:
        dq = made_by.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if len(dq.input) > 2 and dq.input[2] in inits and numpy_helper.to_array(inits[dq.input[2]]).any():
            continue
        found[node.name] = (node, dq)
    return found


def qdq_inputs(quantized) -> dict[str, tuple]:
    """{conv name: (activation scale, zero point, weight int8, weight scales)} of a QDQ graph's quantized Conv
    nodes (int8 weights and an input through DequantizeLinear), read from the Q/DQ nodes onnxruntime put
    before them."""
    init = initializer_arrays(quantized)
    made_by = producers(quantized.graph)
    found = {}
    for name, (node, w_dq) in int8_convs(quantized).items():
        x_dq = made_by.get(node.input[0])
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            continue
        found[name] = (init[x_dq.input[1]], init[x_dq.input[2]] if len(x_dq.input) > 2 else 0,
                       init[w_dq.input[0]], init[w_dq.input[1]])
    return found
