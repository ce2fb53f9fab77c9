"""Deployment path: QDQ ONNX export, ONNX Runtime runner, TensorRT engine builder.

Modules: :mod:`.onnx` (export driver and checks), :mod:`.qdq` (how each
quantizer traces to Q/DQ), :mod:`.graph` (int8 weight initializers, graph
inspection), :mod:`._attention` (shape-free ``nn.MultiheadAttention`` for
export), :mod:`.ort` (ONNX Runtime), :mod:`.openvino` (OpenVINO), :mod:`.tensorrt` (TensorRT),
:mod:`.command` (``esc-quantize export``).

>>> import esc_plugin as esc
>>> from esc_plugin.export import export_qdq_onnx, OrtRunner
>>> qmodel = esc.quantize(model, esc.QuantConfig(bits=8, method="esc"), loop, objective)  # doctest: +SKIP
>>> export_qdq_onnx(qmodel, (feats,), "model.onnx", ["feats"], ["logits"],
...                 dynamic_axes={"feats": {0: "batch", 1: "time"},
...                               "logits": {0: "batch", 1: "time"}})                     # doctest: +SKIP
>>> OrtRunner("model.onnx")(feats)                                                     # doctest: +SKIP

``tensorrt`` and ``openvino`` are imported lazily (``openvino`` by :class:`OpenVinoRunner`);
``tensorrt`` by :func:`build_engine` / :class:`TrtRunner`.
"""
from .errors import ExportError
from .graph import count_qdq, export_metadata, fold_weight_quantizers, op_counts, qdq_nodes
from .onnx import check_exportable, export_qdq_onnx
from .qdq import MODES, export_context
from .ort import INTEGER_OPS, OrtRunner, int8_kernels_exact, integer_ops, ort_optimized_model
from .tensorrt import TrtRunner, build_engine
from .openvino import OpenVinoRunner, int8_compute_ops, runs_int8, runtime_precisions

__all__ = ["int8_kernels_exact", "ExportError", "MODES", "check_exportable", "fold_weight_quantizers", "count_qdq", "export_context",
           "export_metadata", "export_qdq_onnx", "op_counts", "qdq_nodes", "INTEGER_OPS",
           "OrtRunner", "integer_ops", "ort_optimized_model", "TrtRunner", "build_engine",
           "OpenVinoRunner", "runtime_precisions", "int8_compute_ops", "runs_int8"]
