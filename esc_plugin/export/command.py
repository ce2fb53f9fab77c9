"""``esc-quantize export``: a quantized result -> a deployment artifact, checked against the simulation.

>>> request = plan_export("runs/demo-w8", "openvino")               # doctest: +SKIP
>>> export_result(request, check=True)                              # doctest: +SKIP

Sources (:func:`plan_export` tells them apart and validates everything before
any model is built):

* a folder written by ``esc-quantize run`` (or its ``quantized.pt``): the
  ``task.json`` beside the state names the task and its builder arguments,
  so the FP32 model is rebuilt by the task and re-quantized with
  ``esc.load`` (which refuses other weights). A ``task.json`` may only name a
  registered task (:data:`esc_plugin.tasks.BUILDERS`); a user's own
  ``package.module:function`` builder is imported only when given on the
  command line (``--task``), never because a file says so;
* a quantized ``.nemo`` (``esc_plugin.nemo.save_quantized_asr_model``),
  exported with NeMo's exporter (:func:`esc_plugin.nemo.export.export_quantized_asr_model`).

A SpeechBrain stage folder (``quantized.pt`` + ``checkpoint/``) needs the
recipe's Brain to rebuild the model; the error says how to export it from the
recipe instead. How each format is written and run is :mod:`.artifacts`; the
``--check`` numbers are :mod:`.check`.
"""
import json
import os
import tarfile
from dataclasses import dataclass, field

from esc_plugin.core.errors import ConfigError

from .artifacts import DEFAULT_NAMES, FORMATS, SUFFIXES, tensorrt_available, written_paths
from .qdq import MODES

TASK_FILE = "task.json"
TASK_FORMAT = "esc_plugin.task/1"
STATE_FILE = "quantized.pt"
NEMO_STATE_MEMBER = "esc_quantization.pt"


@dataclass
class ExportRequest:
    """Everything :func:`export_result` needs, validated by :func:`plan_export`."""

    kind: str                      # "task" or "nemo"
    source: str
    fmt: str
    mode: str
    out: str
    state_path: str = None
    task: str = None
    task_kwargs: dict = field(default_factory=dict)
    clip_activations: bool = False
    threads: int = 1
    max_audio_seconds: float = None  # .nemo only: positional-table length


# ---------------------------------------------------------------- task.json

def write_task_file(folder, task, kwargs):
    """Record how to rebuild a run's FP32 model: ``task.json`` = task name + builder kwargs."""
    from esc_plugin.core.io import write_json

    write_json(os.path.join(folder, TASK_FILE), {"format": TASK_FORMAT, "task": task, "kwargs": dict(kwargs)})


def _read_task_file(path):
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}): rerun esc-quantize run, or name the task "
                          "with --task.") from exc
    if not isinstance(spec, dict) or spec.get("format") != TASK_FORMAT or not isinstance(spec.get("kwargs"), dict):
        raise ConfigError(f"{path} is not a task file written by esc-quantize run (format {TASK_FORMAT}).")
    return spec


# ---------------------------------------------------------------- validation

def _state_config(state, where):
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("esc_plugin.quantized/"):
        raise ConfigError(f"{where} is not a quantized result (no esc_plugin quantization state): export "
                          "the output of esc-quantize run (its folder or quantized.pt) or a quantized "
                          ".nemo (esc_plugin.nemo.save_quantized_asr_model).")
    return state.get("config") or {}


def _read_nemo_config(path):
    import tempfile

    from esc_plugin.core.state import read_state_file

    try:
        with tarfile.open(path) as tar:
            names = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            if NEMO_STATE_MEMBER not in names:
                raise ConfigError(f"{path} is an FP32 .nemo (it holds no {NEMO_STATE_MEMBER}): quantize it "
                                  "first with esc_plugin.nemo.quantize_asr_model and save_quantized_asr_model.")
            data = tar.extractfile(names[NEMO_STATE_MEMBER]).read()
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable .nemo archive ({exc}).") from exc
    with tempfile.TemporaryDirectory() as tmp:
        state_file = os.path.join(tmp, NEMO_STATE_MEMBER)
        with open(state_file, "wb") as f:
            f.write(data)
        return _state_config(read_state_file(state_file, "quantization state"), path)


def check_format(fmt, mode, weight_bits, act_bits):
    """Refuse a format / mode / bit-width combination that cannot be built, naming the fix."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: choose one of {', '.join(MODES)}.")
    if act_bits == 4 and mode == "qdq":
        raise ConfigError(
            f"the result is W{weight_bits}A4: 4-bit activations have no int8 kernels (ONNX Runtime, "
            f"OpenVINO and TensorRT quantize activations to int8), so --format {fmt} --mode qdq cannot "
            "be built. Use --format qdq-onnx --mode simulation (the W4A4 numerics as float ONNX ops, "
            "for accuracy checks) or --mode weight_only, or re-quantize with --act-bits 8.")
    if fmt == "tensorrt" and mode != "qdq":
        raise ConfigError(f"--format tensorrt --mode {mode}: a TensorRT engine is built from the int8 "
                          "QDQ graph only (--mode qdq); use --format qdq-onnx for other modes.")


def check_runtimes(fmt, check):
    """The packages the export (and ``--check``) needs, or an error naming the extra to install."""
    import importlib.util

    needs = [("onnx", "onnx")]
    if fmt == "openvino":
        needs.append(("openvino", "openvino"))
    if check and fmt == "qdq-onnx":
        needs.append(("onnxruntime", "onnx"))
    for module, extra in needs:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--format {fmt}{' --check' if check else ''} needs {module}, which is not "
                              f'installed: pip install -e ".[{extra}]".')
    if fmt == "tensorrt" and check and tensorrt_available() is False:
        raise ConfigError("--format tensorrt --check runs the engine, which needs TensorRT and an NVIDIA "
                          "GPU; TensorRT is not installed here. Drop --check to write the QDQ ONNX and get "
                          "the trtexec command to build the engine where TensorRT is.")


def check_output(fmt, out, overwrite, protected=()):
    """``out`` must end with the format's suffix, lie in a writable folder, and not exist (unless
    ``overwrite``); it may never be one of ``protected`` (the source, FP32 files)."""
    from esc_plugin.cli import check_writable_folder

    if not out.endswith(SUFFIXES[fmt]):
        raise ConfigError(f"--out {out!r}: a {fmt} artifact is a {' or '.join(SUFFIXES[fmt])} file; "
                          f"e.g. --out {os.path.join(os.path.dirname(out), DEFAULT_NAMES[fmt])}.")
    paths = written_paths(fmt, out)
    keep = {os.path.realpath(p) for p in protected}
    for p in paths:
        if os.path.realpath(p) in keep:
            raise ConfigError(f"--out {out!r} would overwrite {p}, the source of this export: choose "
                              "another --out.")
        if os.path.isdir(p):
            raise ConfigError(f"--out: {p} is a folder; give a file name such as "
                              f"{os.path.join(p, DEFAULT_NAMES[fmt])}.")
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: pass "
                          "--overwrite to replace (the new files are written beside it and renamed into "
                          "place), or choose another --out.")
    check_writable_folder(os.path.dirname(os.path.abspath(out)), "--out's folder")
    return paths


def _resolve_task_source(source, task, shared):
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    state_path = os.path.join(source, STATE_FILE) if os.path.isdir(source) else source
    from esc_plugin.core.state import read_state_file

    if not os.path.isfile(state_path):
        raise ConfigError(f"{source} holds no {STATE_FILE}: give the --out folder of esc-quantize run "
                          "(or its quantized.pt) or a quantized .nemo.")
    try:
        state = read_state_file(state_path, "quantization state")
    except ConfigError:
        state = None  # torch's own message (about weights_only) would point the wrong way
    config = _state_config(state, state_path)
    task_file = os.path.join(folder, TASK_FILE)
    kwargs = {}
    if task is None:
        if not os.path.isfile(task_file):
            if os.path.isdir(os.path.join(folder, "checkpoint")):
                raise ConfigError(
                    f"{folder} is a SpeechBrain stage folder: its model is rebuilt by the recipe's Brain, "
                    "which esc-quantize cannot construct. Export from the recipe: qmodules = "
                    "esc_plugin.speechbrain.load_quantized(brain, folder), then "
                    "esc_plugin.export.export_qdq_onnx(qmodules[<module>], ...).")
            raise ConfigError(f"{folder} has no {TASK_FILE} (written by esc-quantize run since the export "
                              "command exists): name the task that made it, e.g. --task honk "
                              "[--shared PATH], or rerun esc-quantize run.")
        spec = _read_task_file(task_file)
        from esc_plugin.tasks import BUILDERS

        task, kwargs = spec.get("task"), spec["kwargs"]
        if task not in BUILDERS:
            raise ConfigError(f"{task_file} names the task {task!r}, which is not a registered task "
                              f"({', '.join(sorted(BUILDERS))}): a builder named in a file is never "
                              f"imported; pass --task {task} on the command line to run it.")
    if shared is not None:
        kwargs = dict(kwargs, shared_root=shared)
    return state_path, config, task, kwargs


def plan_export(source, fmt="qdq-onnx", out=None, mode="qdq", overwrite=False, check=False, task=None,
                shared=None, clip_activations=False, threads=1, max_audio_seconds=None):
    """Validate an export (source, format, mode, runtimes, output path) before any work.

    Returns an :class:`ExportRequest`; raises :class:`ConfigError` naming the fix.
    """
    source = os.fspath(source)
    if not os.path.exists(source):
        raise ConfigError(f"{source} does not exist: give the --out folder of esc-quantize run, its "
                          "quantized.pt, or a quantized .nemo.")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads {threads!r}: give a positive number of CPU threads.")
    if max_audio_seconds is not None and not (source.endswith(".nemo") and max_audio_seconds > 0):
        raise ConfigError(f"--max-audio-seconds {max_audio_seconds}: give a positive number of seconds, "
                          "for a .nemo source (the Conformer's positional table); other sources have none.")
    if source.endswith(".nemo"):
        if task is not None or shared is not None:
            raise ConfigError("--task / --shared are for esc-quantize run folders; a .nemo holds its model.")
        kind, state_path, config, kwargs = "nemo", None, _read_nemo_config(source), {}
        default_out = os.path.splitext(source)[0] + os.path.splitext(DEFAULT_NAMES[fmt])[1]
    else:
        kind = "task"
        state_path, config, task, kwargs = _resolve_task_source(source, task, shared)
        default_out = os.path.join(os.path.dirname(os.path.abspath(state_path)), DEFAULT_NAMES[fmt])
    check_format(fmt, mode, config.get("weight_bits"), config.get("act_bits"))
    check_runtimes(fmt, check)
    out = os.fspath(out) if out is not None else default_out
    check_output(fmt, out, overwrite, protected=[p for p in (source, state_path) if p])
    if kind == "task":
        from esc_plugin.cli import task_builder

        task_builder(task)  # importable, before any work
    return ExportRequest(kind, source, fmt, mode, out, state_path, task, kwargs, clip_activations, threads,
                         max_audio_seconds)


def plan_run_export(out_folder, fmt, mode, overwrite, config, task, task_kwargs):
    """``esc-quantize run --export``: validate the export of a run that has not happened yet
    (``config`` gives the bit widths); the artifact goes into the run folder."""
    if not out_folder:
        raise ConfigError("--export needs --out: the artifact is written into the run folder, beside quantized.pt.")
    check_format(fmt, mode, config.weight_bits, config.act_bits)
    check_runtimes(fmt, check=fmt != "tensorrt")
    out = os.path.join(out_folder, DEFAULT_NAMES[fmt])
    check_output(fmt, out, overwrite)
    return ExportRequest("task", out_folder, fmt, mode, out, task=task, task_kwargs=dict(task_kwargs))


# ---------------------------------------------------------------- execution

def export_result(request, check=False, progress=True):
    """Rebuild the quantized model of ``request`` and write (and with ``check``, verify) its artifact.

    Returns a dict: ``files`` written, ``artifact``, ``trtexec`` (when TensorRT
    is missing here) and, with ``check``, the :func:`~esc_plugin.export.check.check_artifact` result.
    """
    if request.kind == "nemo":
        from .nemo_source import export_nemo
        return export_nemo(request, check)
    import esc_plugin as esc
    from esc_plugin.tasks import get_task

    described = f"{request.task!r}" + (f" {request.task_kwargs}" if request.task_kwargs else "")
    print(f"Rebuilding task {described} and its quantized model from {request.state_path} ...", flush=True)
    task = get_task(request.task, **request.task_kwargs)
    qmodel = esc.load(task.model, request.state_path)
    return export_task_model(task, qmodel, request, check, progress)


def export_task_model(task, qmodel, request, check=False, progress=True):
    """Write the artifact of a task's quantized model (used by ``export`` and ``run --export``)."""
    from .check import capture_inputs, check_artifact, write_single_graph

    inputs = capture_inputs(qmodel, task.forward_loop)
    result = write_single_graph(qmodel, inputs, request)
    if check and result.get("artifact"):
        result["check"] = check_artifact(request.fmt, result["artifact"], qmodel, inputs, task,
                                         threads=request.threads, progress=progress)
    return result
