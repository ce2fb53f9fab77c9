"""Run a QDQ ONNX model with OpenVINO (CPU), and check that it really runs int8.

>>> runner = OpenVinoRunner("model.onnx")                  # doctest: +SKIP
>>> logits, = runner(feats)                                # doctest: +SKIP
>>> int8_compute_ops(runner)                               # doctest: +SKIP
{'Convolution': {'int8': 1, 'float': 0}, 'FullyConnected': {'int8': 3, 'float': 0}}

OpenVINO reads the ONNX file written by
:func:`~esc_plugin.export.export_qdq_onnx` directly (no conversion step): its
front end turns each ``QuantizeLinear -> DequantizeLinear`` pair into a
``FakeQuantize``, and the CPU plugin's low-precision transformations move the
dequantization scales past the following Convolution / MatMul so that the op
itself computes on u8/i8 inputs with int32 accumulation (oneDNN kernels).
Whether that happened is a property of the *compiled* model, not of the file:
:func:`runtime_precisions` reads the execution graph
(``compiled.get_runtime_model()``) and each node's
``rt_info["runtimePrecision"]``, so a test or a benchmark can assert on it
instead of assuming it.

Precision of the float parts: on CPUs with bf16 support OpenVINO's default
``INFERENCE_PRECISION_HINT`` is bf16, which rounds everything between the int8
ops to 8 mantissa bits and moves the outputs away from the simulation for
reasons that have nothing to do with quantization. :class:`OpenVinoRunner`
therefore asks for ``precision="f32"`` by default; ``precision=None`` keeps
OpenVINO's own choice (the faster one on such CPUs).

``openvino`` is an optional dependency, imported lazily:
``pip install -e ".[openvino]"``.
"""
import os
from collections import Counter

import numpy as np

from .errors import ExportError
from .openvino_barriers import RT_INFO_KEY, check_barriers

INSTALL_HINT = ('OpenVINO is not installed: pip install -e ".[openvino]" (or pip install openvino); '
                "the QDQ ONNX itself and ONNX Runtime (OrtRunner) do not need it.")

#: Execution-graph layer types that do the multiply-accumulate work (what int8 is for).
COMPUTE_OPS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")

#: Runtime precisions that mean the op computes on integer inputs.
INT8_PRECISIONS = frozenset({"i8", "u8"})

#: Values ``precision=`` accepts (``None``: OpenVINO's default for the device).
PRECISIONS = ("f32", "bf16", "f16")


def import_openvino():
    """``import openvino``, or an :class:`ExportError` naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise ExportError(INSTALL_HINT) from exc
    return openvino


def _numpy(x):
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def _compile_config(threads, precision):
    try:
        threads = int(threads)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"threads={threads!r}: give a positive number of CPU threads.") from exc
    if threads < 1:
        raise ExportError(f"threads={threads}: give a positive number of CPU threads (1 for "
                          "predictable timings next to other jobs).")
    if precision is not None and precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)} or None "
                          "(OpenVINO's default for the device).")
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


class OpenVinoRunner:
    """``OpenVinoRunner(path)(*inputs) -> list of numpy arrays``, like :class:`~esc_plugin.export.OrtRunner`.

    Arguments
    ---------
    path : str
        ONNX file (e.g. from :func:`~esc_plugin.export.export_qdq_onnx`), or an
        OpenVINO IR ``.xml``.
    threads : int
        CPU inference threads (1 by default: predictable timings next to other jobs).
    device : str
        OpenVINO device name (``"CPU"``; ``openvino.Core().available_devices`` lists them).
    precision : str or None
        Inference precision of the float (non-int8) parts: ``"f32"`` (default,
        closest to the simulation), ``"bf16"``, ``"f16"``, or ``None`` for
        OpenVINO's default on the device.
    fusion_barriers : list of str
        Internal tensors to make extra outputs so OpenVINO cannot fuse the
        quantizers they feed (:func:`~esc_plugin.export.openvino_barriers.find_fusion_barriers`
        finds them; an IR written by ``esc-quantize export --format openvino``
        lists its own). The runner returns the model's outputs only.

    Attributes: ``path``, ``compiled`` (the ``openvino.CompiledModel``),
    ``input_names``, ``output_names``, ``fusion_barriers``.
    """

    def __init__(self, path, threads=1, device="CPU", precision="f32", fusion_barriers=()):
        config = _compile_config(threads, precision)
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ExportError(f"{self.path} does not exist: export it first with export_qdq_onnx "
                              "(or esc-quantize export).")
        ov = import_openvino()
        core = ov.Core()
        if device not in core.available_devices:
            raise ExportError(f"OpenVINO device {device!r} is not available here: available devices "
                              f"are {core.available_devices}.")
        try:
            model = core.read_model(self.path)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message
            raise ExportError(f"OpenVINO could not read {self.path}: {type(exc).__name__}: {exc}") from exc
        stored = _stored_barriers(model)
        check_barriers([o.get_any_name() for o in model.outputs if o.get_any_name() not in stored],
                       list(fusion_barriers))
        self.fusion_barriers = stored + [b for b in fusion_barriers if b not in stored]
        try:
            if len(self.fusion_barriers) > len(stored):
                model.add_outputs(self.fusion_barriers[len(stored):])
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise ExportError(f"OpenVINO could not compile {self.path} for {device}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.device = device
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        barriers = set(self.fusion_barriers)
        own = [(i, o) for i, o in enumerate(self.compiled.outputs) if not (o.get_names() & barriers)]
        self._outputs = [i for i, _ in own]
        self.output_names = [o.get_any_name() for _, o in own]
        self._request = self.compiled.create_infer_request()

    def __call__(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise ExportError(f"{os.path.basename(self.path)} takes {len(self.input_names)} inputs "
                              f"{self.input_names}, got {len(inputs)}.")
        self._request.infer({i: _numpy(x) for i, x in enumerate(inputs)})
        # Copies: the request's output buffers are reused by the next call.
        return [np.array(self._request.get_output_tensor(i).data, copy=True) for i in self._outputs]


def _stored_barriers(model):
    """Barrier tensors an IR written by :func:`~esc_plugin.export.artifacts.write_openvino_ir` lists."""
    if not model.has_rt_info(RT_INFO_KEY):
        return []
    return model.get_rt_info(RT_INFO_KEY).astype(str).split()


def _compiled(compiled_or_runner):
    compiled = getattr(compiled_or_runner, "compiled", compiled_or_runner)
    if not hasattr(compiled, "get_runtime_model"):
        raise ExportError(f"expected an OpenVinoRunner or an openvino.CompiledModel, got "
                          f"{type(compiled_or_runner).__name__}.")
    return compiled


def _rt(info, key):
    value = info[key] if key in info.keys() else None
    return None if value is None else value.astype(str)


def runtime_precisions(compiled_or_runner):
    """``{layer_type: {runtime_precision: count}}`` of the compiled model's execution graph.

    Layer types are the CPU plugin's (``Convolution``, ``FullyConnected`` for a
    MatMul with a constant weight, ``MatMul`` for two activations,
    ``FakeQuantize``, ``Eltwise``, ...); the precision is the one the node
    computes in (``u8`` / ``i8`` for an int8 kernel, ``f32``, ``bf16``).

    Example
    -------
    >>> import os, tempfile, torch, esc_plugin as esc
    >>> from esc_plugin.export import export_qdq_onnx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> data = [torch.randn(4, 8) for _ in range(2)]
    >>> def loop(m):
    ...     for x in data: m(x)
    >>> q = esc.quantize(model, esc.QuantConfig(bits=8, method="max"), loop, progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_qdq_onnx(q, data[0], os.path.join(tmp.name, "m.onnx"), ["x"], ["y"])
    >>> runner = OpenVinoRunner(path)
    >>> runtime_precisions(runner)["FullyConnected"]
    {'i8': 2}
    >>> int8_compute_ops(runner), runs_int8(runner)
    ({'FullyConnected': {'int8': 2, 'float': 0}}, True)
    >>> tmp.cleanup()
    """
    table = {}
    for node in _compiled(compiled_or_runner).get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        layer = _rt(info, "layerType") or node.get_type_name()
        precision = _rt(info, "runtimePrecision") or "undefined"
        table.setdefault(layer, Counter())[precision] += 1
    return {layer: dict(sorted(c.items())) for layer, c in sorted(table.items())}


def int8_compute_ops(compiled_or_runner, op_types=COMPUTE_OPS):
    """``{layer_type: {"int8": n, "float": m}}`` for the multiply-accumulate layers present
    (:data:`COMPUTE_OPS`): how many of them run an int8 kernel and how many stay float."""
    out = {}
    for layer, precisions in runtime_precisions(compiled_or_runner).items():
        if layer not in op_types:
            continue
        n_int8 = sum(n for p, n in precisions.items() if p in INT8_PRECISIONS)
        out[layer] = {"int8": n_int8, "float": sum(precisions.values()) - n_int8}
    return out


def runs_int8(compiled_or_runner, op_types=COMPUTE_OPS, require="any"):
    """Whether the compiled model runs its Convolution / MatMul work as int8 kernels.

    ``require="any"``: at least one such layer computes in u8/i8 (the model was
    quantized and OpenVINO used it); ``"all"``: every such layer does (no
    quantized op fell back to float; layers left in float on purpose, e.g. by
    ``QuantConfig(exclude=...)``, also count as float).
    """
    if require not in ("any", "all"):
        raise ExportError(f"require={require!r}: choose 'any' or 'all'.")
    counts = int8_compute_ops(compiled_or_runner, op_types)
    n_int8 = sum(c["int8"] for c in counts.values())
    n_float = sum(c["float"] for c in counts.values())
    return n_int8 > 0 and (require == "any" or n_float == 0)
