"""The deployment artifacts ``esc-quantize export`` writes, and how each one is run.

Formats (:data:`FORMATS`):

* ``qdq-onnx``: the QDQ ONNX of :func:`~esc_plugin.export.export_qdq_onnx`,
  run with ONNX Runtime (:class:`~esc_plugin.export.OrtRunner`);
* ``openvino``: that ONNX read by OpenVINO and saved as OpenVINO IR
  (``model.xml`` + ``model.bin``, float weights not compressed to f16, the
  Q/DQ pairs kept as ``FakeQuantize``), run with
  :class:`~esc_plugin.export.openvino.OpenVinoRunner`;
* ``tensorrt``: the QDQ ONNX beside the engine path, then a strongly typed
  engine (:func:`~esc_plugin.export.build_engine`) where TensorRT is
  installed; where it is not, :func:`trtexec_command` is what to run on a
  machine that has it.

Every file is written to a temporary name in the target folder and renamed
into place, so a failed export leaves nothing half-written.

>>> trtexec_command("m.onnx", "m.engine", {"feats": ((1, 40, 50), (50, 40, 50), (100, 40, 50))})
'trtexec --onnx=m.onnx --stronglyTyped --saveEngine=m.engine --minShapes=feats:1x40x50 --optShapes=feats:50x40x50 --maxShapes=feats:100x40x50'
"""
import os
import shlex
import shutil
import tempfile

from .errors import ExportError

FORMATS = ("qdq-onnx", "openvino", "tensorrt")

#: What ``--out`` must end with, per format.
SUFFIXES = {"qdq-onnx": (".onnx",), "openvino": (".xml",), "tensorrt": (".engine", ".plan")}

#: Default artifact name inside a run folder, per format.
DEFAULT_NAMES = {"qdq-onnx": "model.onnx", "openvino": "model.xml", "tensorrt": "model.engine"}


def written_paths(fmt, out):
    """Every file an export to ``out`` in format ``fmt`` writes (the ones ``--overwrite`` guards)."""
    stem = os.path.splitext(out)[0]
    if fmt == "openvino":
        return [out, stem + ".bin"]
    if fmt == "tensorrt":
        return [stem + ".onnx", out]
    return [out]


def onnx_path_of(fmt, out):
    """Where an export writes its QDQ ONNX: the artifact itself for ``qdq-onnx``, beside the engine
    for ``tensorrt`` (both in :func:`written_paths`); for ``openvino`` a temporary file in the
    target folder (an intermediate, removed after the IR is written; it never replaces a file)."""
    if fmt == "openvino":
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".tmp-openvino-",
                                   suffix=".onnx")
        os.close(fd)
        return tmp
    return out if fmt == "qdq-onnx" else os.path.splitext(out)[0] + ".onnx"


def tensorrt_available():
    """Whether ``import tensorrt`` works here (the builder needs TensorRT 10+ and a GPU)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _dims(shape):
    return "x".join(str(int(d)) for d in shape)


def trtexec_command(onnx_path, engine_path, shapes):
    """The ``trtexec`` line that builds a strongly typed engine from a QDQ ONNX file.

    ``shapes`` maps each dynamic input to ``(min, opt, max)`` shapes, as for
    :func:`~esc_plugin.export.build_engine`.
    """
    parts = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={engine_path}"]
    for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if shapes:
            parts.append(flag + "=" + ",".join(f"{name}:{_dims(s[k])}" for name, s in shapes.items()))
    return " ".join(shlex.quote(p) if any(c in p for c in " '\"") else p for p in parts)


def profile_shapes(onnx_path, example):
    """TensorRT ``(min, opt, max)`` per graph input, from the export example (positional, in the
    graph's input order): the batch axis from 1 to twice the example's, any other dynamic axis
    (e.g. time) from 1/8 to 4 times the example's, fixed axes as they are; opt = the example."""
    import onnx

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    out = {}
    for value, x in zip(inputs, example):
        opt = tuple(int(d) for d in x.shape)
        dims = value.type.tensor_type.shape.dim
        dynamic = [not d.HasField("dim_value") for d in dims]
        lo = tuple(1 if i == 0 else max(1, n // 8) if dyn else n for i, (n, dyn) in enumerate(zip(opt, dynamic)))
        hi = tuple(2 * n if i == 0 else 4 * n if dyn else n for i, (n, dyn) in enumerate(zip(opt, dynamic)))
        out[value.name] = (lo, opt, hi) if any(dynamic) else (opt, opt, opt)
    return out


def write_openvino_ir(onnx_path, xml_path, probe_inputs=None):
    """Read the QDQ ONNX with OpenVINO and save it as IR (``.xml`` + ``.bin``), atomically.

    ``compress_to_fp16=False``: the IR keeps float32 constants, so it computes
    what the ONNX computes (the int8 weights stay int8 either way).
    ``probe_inputs`` (a few input groups, e.g. calibration batches): compile
    the model on them and add the fusion barriers OpenVINO needs to compute
    what the file says (:mod:`~esc_plugin.export.openvino_barriers`); returns
    what was found (``None`` without probe inputs).
    """
    from .openvino import import_openvino
    from .openvino_barriers import RT_INFO_KEY, find_fusion_barriers

    ov = import_openvino()
    found = find_fusion_barriers(os.fspath(onnx_path), probe_inputs) if probe_inputs else None
    folder = os.path.dirname(os.path.abspath(xml_path))
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    tmp_dir = tempfile.mkdtemp(dir=folder, prefix=".tmp-openvino-")
    try:
        tmp_xml = os.path.join(tmp_dir, stem + ".xml")
        try:
            model = ov.Core().read_model(os.fspath(onnx_path))
            if found and found["barriers"]:
                model.add_outputs(found["barriers"])
                model.set_rt_info(" ".join(found["barriers"]), RT_INFO_KEY)
            ov.save_model(model, tmp_xml, compress_to_fp16=False)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message
            raise ExportError(f"OpenVINO could not convert {onnx_path}: {type(exc).__name__}: {exc}") from exc
        # The weights first: the .xml (the file users open) only appears once its .bin is in place.
        os.replace(os.path.join(tmp_dir, stem + ".bin"), os.path.join(folder, stem + ".bin"))
        os.replace(tmp_xml, os.path.join(folder, stem + ".xml"))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return found


def write_onnx_artifact(fmt, out, write_onnx, probe_inputs=None):
    """``write_onnx(path)`` writes the QDQ ONNX (atomically); for ``openvino`` it is then converted to
    IR (with the fusion barriers ``probe_inputs`` show it needs) and the intermediate removed, whatever
    happens. Returns ``(files written, fusion barriers found or None)``."""
    onnx_path = onnx_path_of(fmt, out)
    if fmt != "openvino":
        write_onnx(onnx_path)
        return [onnx_path], None
    try:
        write_onnx(onnx_path)
        found = write_openvino_ir(onnx_path, out, probe_inputs)
    finally:
        if os.path.exists(onnx_path):
            os.unlink(onnx_path)
    return [out, os.path.splitext(out)[0] + ".bin"], found


def finish_tensorrt(result, onnx_path, example, engine_path, qmodel):
    """``--format tensorrt`` after the QDQ ONNX is written: the ``trtexec`` command in
    ``result``, and the engine when TensorRT is installed (``result["artifact"]`` None otherwise)."""
    shapes = profile_shapes(onnx_path, example)
    result["trtexec"] = trtexec_command(onnx_path, engine_path, shapes)
    if tensorrt_available():
        from .tensorrt import build_engine
        build_engine(onnx_path, engine_path, shapes, qmodel=qmodel)
        result["files"].append(engine_path)
        result["artifact"] = engine_path
    else:
        result["artifact"] = None


def runner_for(fmt, path, threads=1):
    """A runner ``(*inputs) -> list of numpy arrays`` for an artifact of format ``fmt``."""
    if fmt == "qdq-onnx":
        from .ort import OrtRunner
        return OrtRunner(path, threads=threads)
    if fmt == "openvino":
        from .openvino import OpenVinoRunner
        return OpenVinoRunner(path, threads=threads)
    if fmt == "tensorrt":
        from .tensorrt import TrtRunner
        runner = TrtRunner(path)
        return lambda *xs: runner(*xs, as_numpy=True)
    raise ExportError(f"format {fmt!r} is unknown: choose one of {', '.join(FORMATS)}.")


def kernel_summary(fmt, runner):
    """One line on which kernels the artifact really runs (int8 or float), read from the runtime."""
    if fmt == "openvino":
        from .openvino import int8_compute_ops
        ops = int8_compute_ops(runner)
        cells = ", ".join(f"{op} {c['int8']} int8 / {c['float']} float" for op, c in ops.items())
        return f"OpenVINO execution graph: {cells or 'no Convolution / MatMul layer'}"
    if fmt == "qdq-onnx":
        from .ort import int8_kernels_exact, integer_ops, ort_optimized_model
        tmp = tempfile.TemporaryDirectory()
        try:
            fused = integer_ops(ort_optimized_model(runner.path, os.path.join(tmp.name, "opt.onnx")))
        finally:
            tmp.cleanup()
        note = "" if int8_kernels_exact() else \
            " (this CPU has no VNNI: ORT's fused u8 x s8 kernels may saturate here)"
        cells = ", ".join(f"{op} {n}" for op, n in fused.items())
        return f"ONNX Runtime integer kernels: {cells or 'none'}{note}"
    return "TensorRT engine (strongly typed: int8 where the Q/DQ pairs are)"
