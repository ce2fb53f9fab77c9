"""Smaller int8 QDQ graphs with the same arithmetic: shared constants, weights stored in the layout they are used in.

The TorchScript exporter gives every QuantizeLinear / DequantizeLinear node
Constant nodes of its own for the scale and zero point, and every Linear a
``DequantizeLinear -> Transpose`` of its weight. In a float model these are a
small part of the file; once the weights are int8 they are a large one on a
small speech model. :func:`compact_int8_graph` stores each distinct constant
once, as an initializer (zero points excepted: each quantizer keeps its own, as
ONNX Runtime's int8 fusions need), and transposes the int8 weights that only feed a
Transpose, so the file holds what the runtimes build at load time anyway.
Values are moved, never recomputed: the outputs are bit-identical.

Example
-------
>>> import numpy as np
>>> from onnx import TensorProto, helper, numpy_helper
>>> w = numpy_helper.from_array(np.arange(6, dtype=np.int8).reshape(3, 2), "w")
>>> scale = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.float32(0.5)))
>>> dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wf"])
>>> tr = helper.make_node("Transpose", ["wf"], ["wt"], perm=[1, 0])
>>> mm = helper.make_node("MatMul", ["x", "wt"], ["y"])
>>> graph = helper.make_graph([scale, dq, tr, mm], "g",
...                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
...                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
>>> model = helper.make_model(graph)
>>> compact_int8_graph(model)
{'constants_shared': 1, 'weights_transposed': 1}
>>> [n.op_type for n in model.graph.node]
['DequantizeLinear', 'MatMul']
"""
import hashlib

import numpy as np

from .graph import QDQ_OPS, fold_weight_quantizers


def int8_weight_layout(model):
    """The exporters' default int8 layout, in place: :func:`~esc_plugin.export.graph.fold_weight_quantizers`,
    then :func:`compact_int8_graph`. Returns ``{"folded": n, "constants_shared": n, "weights_transposed": n}``."""
    folded = fold_weight_quantizers(model)
    return {"folded": folded, **compact_int8_graph(model)}


def compact_int8_graph(model):
    """Rewrite ``model`` (an ONNX ModelProto, in place); returns what was changed."""
    shared = share_constants(model)
    return {"constants_shared": shared, "weights_transposed": fold_weight_transposes(model)}


def share_constants(model):
    """Turn Constant nodes into initializers and store identical constants once.

    Returns the number of Constant nodes and duplicate initializers removed. Graph inputs
    and outputs keep their names; names read inside subgraphs are renamed too.
    """
    from onnx import numpy_helper

    graph = model.graph
    protected = {v.name for v in graph.input} | {v.name for v in graph.output}
    zero_points = zero_point_names(graph)
    seen, rename, initializers = {}, {}, []

    def key_of(tensor):
        if tensor.name in zero_points:
            return None  # moved to an initializer, never merged
        array = numpy_helper.to_array(tensor)
        return tensor.data_type, array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()

    def store(tensor, key):
        """Keep ``tensor`` as an initializer, or point its readers at an identical one."""
        if key in seen:
            rename[tensor.name] = seen[key]
            return
        if key is not None:
            seen[key] = tensor.name
        initializers.append(tensor)

    for tensor in graph.initializer:
        store(tensor, None if tensor.name in protected else key_of(tensor))
    nodes = []
    for node in graph.node:
        value = _constant_tensor(node)
        if value is None or node.output[0] in protected:
            nodes.append(node)
            continue
        tensor = type(value)()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        store(tensor, key_of(tensor))
    _rename_inputs(nodes, rename)
    duplicates = sum(1 for t in graph.initializer if t.name in rename)
    removed = len(graph.node) - len(nodes) + duplicates
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return removed


def fold_weight_transposes(model):
    """``int8 initializer -> DequantizeLinear -> Transpose`` becomes the transposed initializer
    read by the DequantizeLinear (its channel axis moved along). Returns the number folded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers, producer = {}, {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    outputs = {v.name for v in graph.output}
    folded = set()
    for transpose in graph.node:
        if transpose.op_type != "Transpose":
            continue
        dq = producer.get(transpose.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.output[0] in outputs \
                or len(readers.get(dq.output[0], [])) != 1:
            continue
        weight = initializers.get(dq.input[0])
        if weight is None or len(readers.get(weight.name, [])) != 1:
            continue
        codes = numpy_helper.to_array(weight)
        if codes.dtype != np.int8:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None) \
            or list(range(codes.ndim))[::-1]
        scale = initializers.get(dq.input[1])
        if scale is None:
            continue
        if numpy_helper.to_array(scale).size > 1:  # per channel: the channel axis moves with the data
            axis = next((a for a in dq.attribute if a.name == "axis"), None)
            new_axis = perm.index((axis.i if axis is not None else 1) % codes.ndim)
            if axis is not None:
                axis.i = new_axis
            else:
                dq.attribute.append(helper.make_attribute("axis", new_axis))
        weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(codes.transpose(perm)), weight.name))
        dq.output[0] = transpose.output[0]  # the DequantizeLinear now writes what the Transpose did
        folded.add(id(transpose))
    nodes = [n for n in graph.node if id(n) not in folded]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(folded)


def zero_point_names(graph):
    """Names read as a QuantizeLinear / DequantizeLinear zero point: not to be merged across quantizers.

    ONNX Runtime rewrites int8 zero points to uint8 in place on x86 and skips (then does not fuse) a
    Q/DQ pair whose zero point other nodes share.
    """
    return {n.input[2] for n in graph.node if n.op_type in QDQ_OPS and len(n.input) > 2}


def _constant_tensor(node):
    """The tensor of a ``Constant`` node given by its ``value`` attribute, else None."""
    if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
        return None
    return node.attribute[0].t


def _rename_inputs(nodes, rename):
    """Point node inputs (and those of their subgraphs, which may read outer names) at the kept copy."""
    if not rename:
        return
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_inputs(sub.node, rename)
