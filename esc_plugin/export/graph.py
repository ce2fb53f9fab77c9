"""Reading and rewriting exported ONNX graphs: int8 weight initializers, Q/DQ and metadata inspection.

:func:`fold_weight_quantizers` turns every ``initializer -> QuantizeLinear``
into an int8 initializer holding the codes (what :func:`export_qdq_onnx` does
by default, so the file holds int8 weights); :func:`op_counts`,
:func:`count_qdq`, :func:`qdq_nodes` and :func:`export_metadata` read an ONNX
file or ModelProto back.
"""
import os
from collections import Counter

from .errors import ExportError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
METADATA_PREFIX = "esc_plugin."


def _constant_values(model):
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def fold_weight_quantizers(model):
    """Turn every ``initializer -> QuantizeLinear`` of ``model`` (an ONNX ModelProto,
    changed in place) into an int8 initializer holding the codes.

    ONNX QuantizeLinear is ``saturate(round_half_even(x / scale) + zero_point)``;
    it is evaluated here with numpy in float32, which is what ONNX Runtime's
    constant folding computes too. Returns the number of folded weights.
    """
    import numpy as np
    from onnx import numpy_helper

    values = _constant_values(model)
    weights = {t.name for t in model.graph.initializer}
    kept, folded = [], []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in weights:
            kept.append(node)
            continue
        w, scale = values[node.input[0]], values[node.input[1]]
        zero = values[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int8)
        if zero.dtype != np.int8:
            raise ExportError(f"{node.name}: zero point of type {zero.dtype}; only int8 weights are folded.")
        if scale.ndim == 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        q = np.clip(np.rint(w / scale) + zero.astype(np.float32), -128, 127).astype(np.int8)
        folded.append(numpy_helper.from_array(q, node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    initializers = [t for t in model.graph.initializer if t.name in used] + folded
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    return len(folded)


def _load(path_or_model):
    import onnx
    if isinstance(path_or_model, (str, os.PathLike)):
        return onnx.load(os.fspath(path_or_model))
    return path_or_model


def op_counts(path_or_model):
    """Counter of node op types in the main graph."""
    return Counter(n.op_type for n in _load(path_or_model).graph.node)


def count_qdq(path_or_model):
    """``{"QuantizeLinear": n, "DequantizeLinear": m}`` of an ONNX file (or ModelProto)."""
    counts = op_counts(path_or_model)
    return {op: counts.get(op, 0) for op in QDQ_OPS}


def export_metadata(path_or_model):
    """The ``esc_plugin.*`` metadata written by :func:`export_qdq_onnx` (keys without the prefix)."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in _load(path_or_model).metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def qdq_nodes(path_or_model):
    """One dict per QuantizeLinear / DequantizeLinear node: ``op``, ``name``, ``input``,
    ``axis`` (None if absent), ``scale`` and ``zero_point`` (numpy arrays, None if not constant)."""
    model = _load(path_or_model)
    consts = _constant_values(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in QDQ_OPS:
            continue
        attrs = {a.name: a.i for a in n.attribute if a.name == "axis"}
        out.append({
            "op": n.op_type, "name": n.name, "input": n.input[0],
            "axis": attrs.get("axis"),
            "scale": consts.get(n.input[1]),
            "zero_point": consts.get(n.input[2]) if len(n.input) > 2 else None,
        })
    return out
