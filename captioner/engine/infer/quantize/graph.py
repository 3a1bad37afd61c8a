"""Reading ONNX graphs, shared by the int8 steps: a node's attribute, and the Conv nodes whose weights are int8.

    attribute(node, "group", 1)
    for name, (conv, weight_dq) in int8_convs(model).items(): ...
"""
from __future__ import annotations


def attribute(node, name: str, default):
    """node's attribute name as a Python value, or default where the node has none."""
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def int8_convs(model) -> dict:
    """{Conv name: (node, weight DequantizeLinear)} of a QDQ graph's Conv nodes whose weights are int8
    initializers with zero points of 0 (onnxruntime's symmetric per-channel weights), in graph order."""
    from onnx import numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    made_by = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        dq = made_by.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if len(dq.input) > 2 and dq.input[2] in inits and numpy_helper.to_array(inits[dq.input[2]]).any():
            continue
        found[node.name] = (node, dq)
    return found
