"""Build and run a TensorRT engine from a QDQ ONNX model (TensorRT 10+ Python API).

>>> build_engine("model.onnx", "model.engine",
...              {"feats": ((1, 80, 16), (8, 80, 500), (16, 80, 3000))})   # doctest: +SKIP
>>> TrtRunner("model.engine")(feats)                                        # doctest: +SKIP

* The network is **strongly typed**
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on TensorRT 10; always on,
  the flag ignored, on TensorRT 11): TensorRT takes each
  tensor's precision from the graph, i.e. int8 exactly where the
  QuantizeLinear/DequantizeLinear pairs are, float elsewhere. There is no INT8
  builder flag and no calibrator (both are for implicit quantization, which
  TensorRT 11 removed); precision flags are not allowed on strongly typed
  networks.
* One optimization profile covers the dynamic axes: ``shapes`` maps each input
  with a dynamic dimension to ``(min, opt, max)`` shapes.
* The engine file is written atomically.
* ``TrtRunner`` uses torch CUDA tensors as I/O buffers
  (``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on
  torch's current stream).

``tensorrt`` is imported only inside these functions: it is not a dependency
of esc_plugin (its PyPI packages fetch the binaries from NVIDIA's index at
install time, and it needs an NVIDIA GPU). Engines are specific to the GPU and
TensorRT version that built them.

INT4 activations: TensorRT has none; an ONNX written with ``act_bits=4`` is
refused before TensorRT is even imported.
"""
import os

from .errors import ExportError

INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt (needs NVIDIA's index: the PyPI package "
    "downloads its binaries from pypi.nvidia.com at install time) on a machine with an NVIDIA GPU "
    "and driver, or use NVIDIA's TensorRT container. The QDQ ONNX itself (export_qdq_onnx) and "
    "ONNX Runtime (OrtRunner) do not need TensorRT."
)


def import_tensorrt():
    """``import tensorrt``, or an :class:`ExportError` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(INSTALL_HINT) from exc
    version = getattr(trt, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 10:
        raise ExportError(f"TensorRT {version} is too old: the engine builder uses the TensorRT 10+ "
                          "API (strongly typed networks, named I/O tensors, execute_async_v3); "
                          "pip install -U tensorrt.")
    return trt


def _strongly_typed_flags(trt):
    """``create_network`` flags: STRONGLY_TYPED on TensorRT 10 (opt-in); TensorRT 11 networks are
    always strongly typed and keep the flag only for compatibility (ignored)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _check_onnx(onnx_path, qmodel=None):
    """Refuse what TensorRT cannot run, before importing it. Returns the graph's inputs as
    ``{name: [dim or label, ...]}``."""
    import onnx

    from .onnx import export_metadata

    onnx_path = os.fspath(onnx_path)
    if not os.path.isfile(onnx_path):
        raise ExportError(f"{onnx_path} does not exist: write it first with export_qdq_onnx.")
    model = onnx.load(onnx_path, load_external_data=False)
    meta = export_metadata(model)
    act_bits = meta.get("act_bits")
    if qmodel is not None and "esc_plan" in qmodel.__dict__:
        act_bits = str(qmodel.esc_plan.config.act_bits)
    if act_bits == "4":
        raise ExportError(
            "act_bits=4: TensorRT has no INT4 activations (its explicit quantization runs int8 "
            "activations; INT4 is weight-only, block-quantized). Build the engine from a W8A8 or "
            "W4A8 model (esc.QuantConfig(weight_bits=4, act_bits=8)) exported with "
            "export_qdq_onnx(mode='qdq'); evaluate W4A4 with mode='simulation' in ONNX Runtime."
        )
    inputs = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                              for d in dims]
    return inputs


def _profile_shapes(inputs, shapes):
    """Validate ``shapes`` against the ONNX inputs; returns ``{name: (min, opt, max)}``."""
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ExportError(f"shapes names {unknown} are not inputs of the ONNX model {sorted(inputs)}.")
    out = {}
    for name, dims in inputs.items():
        dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
        if name not in shapes:
            if dynamic:
                raise ExportError(
                    f"input '{name}' has dynamic axes {[dims[i] for i in dynamic]} (shape {dims}): give "
                    f"shapes={{'{name}': (min_shape, opt_shape, max_shape)}} for the optimization profile."
                )
            continue
        try:
            lo, opt, hi = (tuple(int(v) for v in s) for s in shapes[name])
        except (TypeError, ValueError) as exc:
            raise ExportError(f"shapes['{name}'] must be (min_shape, opt_shape, max_shape), "
                              f"three tuples of ints; got {shapes[name]!r}.") from exc
        for label, s in (("min", lo), ("opt", opt), ("max", hi)):
            if len(s) != len(dims):
                raise ExportError(f"shapes['{name}'] {label} shape {s} has rank {len(s)}, the input "
                                  f"has rank {len(dims)} ({dims}).")
            for i, (v, d) in enumerate(zip(s, dims)):
                if isinstance(d, int) and d > 0 and v != d:
                    raise ExportError(f"shapes['{name}'] {label} shape {s}: axis {i} is fixed to {d} "
                                      "in the ONNX model.")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)) or min(lo) < 1:
            raise ExportError(f"shapes['{name}'] must satisfy 1 <= min <= opt <= max on every axis; "
                              f"got min={lo}, opt={opt}, max={hi}.")
        out[name] = (lo, opt, hi)
    return out


def build_engine(onnx_path, engine_path, shapes=None, *, workspace_gb=4.0, qmodel=None,
                 builder_optimization_level=None, verbose=False):
    """Build a strongly typed TensorRT engine from a QDQ ONNX file and write it atomically.

    Arguments
    ---------
    onnx_path : str
        File written by :func:`~esc_plugin.export.export_qdq_onnx` (``mode="qdq"``).
    engine_path : str
        Serialized engine to write.
    shapes : dict
        ``{input_name: (min_shape, opt_shape, max_shape)}`` for every input with
        a dynamic axis (batch, time), e.g. ``{"feats": ((1, 80, 16), (8, 80, 500), (16, 80, 3000))}``.
    workspace_gb : float
        Builder workspace memory pool limit.
    qmodel : torch.nn.Module, optional
        The quantized model, to check its config (else the ONNX metadata is used).
    builder_optimization_level : int, optional
        TensorRT's builder optimization level (0-5; TensorRT default 3).

    Returns
    -------
    str
        ``engine_path``.
    """
    inputs = _check_onnx(onnx_path, qmodel)
    profile_shapes = _profile_shapes(inputs, shapes)
    trt = import_tensorrt()
    from ..core.io import write_bytes

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT "
                          "log above; rerun with verbose=True for details).")
    write_bytes(engine_path, bytes(serialized))
    return os.fspath(engine_path)


def _torch_dtype(trt, dtype):
    import torch
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
             trt.int32: torch.int32, trt.bool: torch.bool}
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dtype not in table:
        raise ExportError(f"TensorRT tensor dtype {dtype} has no torch equivalent in TrtRunner.")
    return table[dtype]


class TrtRunner:
    """Deserialize an engine and run it: ``TrtRunner(path)(*inputs) -> list of tensors``.

    Inputs may be numpy arrays or torch tensors (copied to the GPU and cast to
    the engine's input dtype); outputs are torch CUDA tensors
    (``as_numpy=True`` returns numpy arrays instead).
    """

    def __init__(self, engine_path, device="cuda"):
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise ExportError("TrtRunner needs a CUDA GPU (torch.cuda.is_available() is False).")
        self.trt, self.device = trt, torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            data = f.read()
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ExportError(f"TensorRT could not deserialize {engine_path}: engines only load with "
                              "the TensorRT version and GPU model that built them; rebuild it here.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, *inputs, as_numpy=False):
        import torch

        if len(inputs) != len(self.input_names):
            raise ExportError(f"the engine takes {len(self.input_names)} inputs {self.input_names}, "
                              f"got {len(inputs)}.")
        keep = []
        for name, x in zip(self.input_names, inputs):
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            t = torch.as_tensor(x).to(self.device, dtype).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ExportError(f"input '{name}' shape {tuple(t.shape)} is outside the engine's "
                                  "optimization profile (the min/max shapes given to build_engine).")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ExportError(f"output '{name}' has a data-dependent shape {shape}: not supported "
                                  "by TrtRunner.")
            out = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)),
                              device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execute_async_v3 failed (see the TensorRT log).")
        stream.synchronize()
        return [o.cpu().numpy() for o in outputs] if as_numpy else outputs
