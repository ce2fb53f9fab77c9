"""Run a QDQ ONNX model with ONNX Runtime (CPU).

No separate "convert to int8" step is needed: with graph optimizations on
(the default, ``ORT_ENABLE_ALL``) ONNX Runtime's QDQ transformers (level
"extended") replace each ``DequantizeLinear -> op [-> QuantizeLinear]`` group
by an integer kernel, folding the weight ``QuantizeLinear`` of a constant
weight into an int8 initializer first:

* ``DQ(x), DQ(W) -> MatMul`` with no Q after it  -> ``MatMulIntegerToFloat``
  (com.microsoft; int8 x int8 -> int32 accumulation, scaled to float);
* ``... -> MatMul -> Q`` -> ``QLinearMatMul``; ``... -> Conv -> Q`` -> ``QLinearConv``;
  ``Gemm`` -> ``QGemm``; and others (QLinearAdd, QLinearConcat, ...).

A ``Conv`` whose output is not re-quantized directly (esc_plugin places Q/DQ
on op *inputs*, the TensorRT layout; e.g. Conv -> ReLU -> Transpose -> Q)
keeps ``DQ -> Conv`` in float on ORT's CPU provider: the numbers are the same,
only the kernel is float. :func:`ort_optimized_model` saves the graph ORT
actually runs, so the integer ops can be checked (:data:`INTEGER_OPS`).
"""
import os

from esc_plugin.core.io import atomic_path

import numpy as np

from .errors import ExportError

#: ORT ops that compute with integer arithmetic (after QDQ fusion).
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
    "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QAttention", "QEmbedLayerNormalization",
    "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose",
})


def int8_kernels_exact():
    """Whether ONNX Runtime's CPU int8 matmul/conv kernels are exact on this machine.

    On x86 CPUs without VNNI (AVX2 or AVX-512F only, e.g. many AMD EPYC and
    older Xeon hosts) ORT multiplies u8 x s8 with ``VPMADDUBSW``, whose int16
    pair sums saturate (ORT's quantization docs: "may suffer from saturation";
    their remedy is 7-bit weights, ``reduce_range``). Then the fused integer
    kernels deviate from the Q/DQ graph they replace (measured here on an AVX2
    EPYC: relative L2 0.17-0.20 on a small Conformer vs 1e-7 with the fusions
    off). With VNNI (``avx512_vnni`` / ``avx_vnni``), ARM, or TensorRT the
    products are exact int32. Returns True when not on Linux x86 (cannot tell).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    if "avx2" not in flags.split():
        return True  # not an x86 CPU with the saturating path (or not x86 at all)
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()))


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover (a dependency of the onnx extra)
        raise ExportError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def _session_options(threads, level):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise ExportError(f"optimization={level!r}: choose one of {', '.join(levels)}.")
    opts.graph_optimization_level = levels[level]
    return opts


def _numpy(x):
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


class OrtRunner:
    """``OrtRunner(path)(*inputs) -> list of numpy arrays`` on ``CPUExecutionProvider``.

    Arguments
    ---------
    path : str
        ONNX file (e.g. from :func:`~esc_plugin.export.export_qdq_onnx`).
    threads : int
        Intra-op threads (1 by default: predictable timings next to other jobs).
    optimization : str
        ``"all"`` (default; QDQ groups run as integer kernels), ``"extended"``,
        ``"basic"`` or ``"disable"`` (runs the Q/DQ nodes literally, in float).
    """

    def __init__(self, path, threads=1, optimization="all"):
        ort = _ort()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ExportError(f"{self.path} does not exist: export it first with export_qdq_onnx.")
        self.session = ort.InferenceSession(self.path, _session_options(threads, optimization),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise ExportError(f"{os.path.basename(self.path)} takes {len(self.input_names)} inputs "
                              f"{self.input_names}, got {len(inputs)}.")
        feeds = {name: _numpy(x) for name, x in zip(self.input_names, inputs)}
        return self.session.run(self.output_names, feeds)


def ort_optimized_model(path, out_path, optimization="extended"):
    """Save the graph ONNX Runtime runs for ``path`` (after its graph optimizations) to
    ``out_path`` (atomically) and return ``out_path``.

    ``"extended"`` (default) includes the QDQ -> integer-kernel fusions and stays
    portable; ``"all"`` adds hardware-specific layout transforms.
    Use :func:`esc_plugin.export.op_counts` on the result and :data:`INTEGER_OPS`.
    """
    with atomic_path(out_path) as tmp:
        opts = _session_options(1, optimization)
        opts.optimized_model_filepath = tmp
        _ort().InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    return os.fspath(out_path)


def integer_ops(path_or_model):
    """``{op_type: count}`` of the integer ops (:data:`INTEGER_OPS`) in a graph."""
    from .onnx import op_counts
    return {op: n for op, n in sorted(op_counts(path_or_model).items()) if op in INTEGER_OPS}
