"""Export a task's quantized model on its calibration inputs, and check the artifact against it.

* :func:`capture_inputs` records the positional inputs the model's root module
  receives while the task's forward loop runs (the calibration batches);
* :func:`write_single_graph` exports the model traced on the first batch, with a
  dynamic batch axis, in the requested format;
* :func:`check_artifact` runs the artifact on every calibration batch and
  compares it to the fake-quantized PyTorch model (relative L2 error, largest
  absolute difference, top-1 agreement for class scores), then evaluates the
  task's metric with the artifact in place of the model.

>>> inputs = capture_inputs(qmodel, task.forward_loop)                  # doctest: +SKIP
>>> check_artifact("openvino", "model.xml", qmodel, inputs, task)       # doctest: +SKIP
"""
import os

import numpy as np
import torch

from .artifacts import finish_tensorrt, runner_for
from .errors import ExportError

#: Calibration batches OpenVINO's compiled model is compared on to find its fusion barriers.
PROBE_BATCHES = 2


def capture_inputs(model, forward_loop):
    """The positional tensor inputs of every call of ``model`` during ``forward_loop(model)``."""
    batches = []

    def record(module, args, kwargs):
        if kwargs:
            raise ExportError(f"{type(module).__name__} is called with keyword arguments {sorted(kwargs)}: "
                              "the export traces positional tensor inputs only; give the task a model "
                              "whose forward takes the features positionally.")
        if not args or not all(torch.is_tensor(a) for a in args):
            raise ExportError(f"{type(module).__name__} is called with non-tensor inputs "
                              f"{[type(a).__name__ for a in args]}: a single ONNX graph takes tensors. "
                              "Encoder-decoder models with generation (Whisper) have their own exporter "
                              "(esc_plugin.export.whisper).")
        batches.append(tuple(a.detach().clone() for a in args))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        handle.remove()
    if not batches:
        raise ExportError("the task's forward loop never called the model: nothing to trace the export on.")
    return batches


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(torch.is_tensor(o) for o in outs):
        raise ExportError(f"{type(model).__name__} returns {[type(o).__name__ for o in outs]}: the export "
                          "needs a model returning tensors.")
    return outs


def io_names(model, example):
    """``(input_names, output_names)``: ``feats`` / ``output`` for one, numbered for several."""
    n_out = len(_outputs(model, example))
    ins = ["feats"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    outs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    return ins, outs


def write_single_graph(qmodel, batches, request):
    """Write ``request.fmt`` for ``qmodel`` traced on ``batches[0]``; returns ``{"files", "artifact", ...}``."""
    from .artifacts import write_onnx_artifact
    from .onnx import export_qdq_onnx

    example = batches[0]
    ins, outs = io_names(qmodel, example)
    files, barriers = write_onnx_artifact(request.fmt, request.out, lambda path: export_qdq_onnx(
        qmodel, example, path, ins, outs, dynamic_axes={n: {0: "batch"} for n in ins + outs},
        mode=request.mode, clip_activations=request.clip_activations), probe_inputs=batches[:PROBE_BATCHES])
    result = {"files": files, "artifact": request.out, "inputs": ins, "outputs": outs}
    if barriers is not None:
        result["fusion_barriers"] = barriers
    onnx_path = files[0]
    if request.fmt == "tensorrt":
        finish_tensorrt(result, onnx_path, example, request.out, qmodel)
    return result


class ArtifactModel(torch.nn.Module):
    """An exported artifact behind a model's call interface, so a task can evaluate it:
    ``ArtifactModel(runner)(*tensors) -> tensor`` (a tuple for several outputs)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, *inputs):
        outs = [torch.from_numpy(np.asarray(o)) for o in self.runner(*inputs)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def agreement(reference, outputs):
    """Relative L2 error, largest absolute difference and (for ``(batch, classes)`` scores) top-1
    agreement of ``outputs`` vs ``reference`` (lists of arrays, one per batch, first output).

    >>> agreement([np.array([[1.0, 2.0]])], [np.array([[1.0, 2.5]])])
    {'rel_l2': 0.22360679774997896, 'max_abs': 0.5, 'top1_agreement': 1.0}
    """
    ref = np.concatenate([np.asarray(r, dtype=np.float64).reshape(len(r), -1) for r in reference])
    got = np.concatenate([np.asarray(o, dtype=np.float64).reshape(len(o), -1) for o in outputs])
    if ref.shape != got.shape:
        raise ExportError(f"the artifact's output shape {got.shape} differs from the model's {ref.shape}.")
    out = {"rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)),
           "max_abs": float(np.abs(got - ref).max())}
    if reference[0].ndim == 2 and reference[0].shape[1] > 1:
        out["top1_agreement"] = float((got.argmax(1) == ref.argmax(1)).mean())
    return out


def saturating_kernels_note(fmt, path, batches, reference, threads=1):
    """On a CPU whose fused int8 kernels saturate (no VNNI / AMX, see
    :func:`~esc_plugin.export.ort.int8_kernels_exact`), the line that says so, and for a
    QDQ ONNX the agreement of the graph itself (ONNX Runtime running its Q/DQ nodes
    literally) with the ``reference`` outputs, so a user can tell the file from the
    kernels. ``(None, None)`` where the kernels are exact or the format is not a CPU one.
    """
    from .ort import OrtRunner, int8_kernels_exact

    if fmt not in ("qdq-onnx", "openvino") or int8_kernels_exact():
        return None, None
    line = ("This CPU has no VNNI / AMX: the int8 kernels of the runtime saturate here (u8 x s8 pair sums "
            "in int16), so part of the difference above is this machine's; deploy on a VNNI / AMX CPU "
            "(or TensorRT) for exact int8 products.")
    if fmt != "qdq-onnx":
        return line, None
    literal_runner = OrtRunner(path, threads=threads, optimization="basic")
    literal = agreement(reference, [np.asarray(literal_runner(*b)[0]) for b in batches])
    return (f"{line} The graph itself (ONNX Runtime's literal Q/DQ) agrees to relative L2 "
            f"{literal['rel_l2']:.3g}, max |diff| {literal['max_abs']:.3g}."), literal


def check_artifact(fmt, path, qmodel, batches, task=None, threads=1, progress=True):
    """Run the artifact on ``batches``; compare with ``qmodel``; evaluate ``task``'s metric with it.

    Returns ``{"agreement": {...}, "kernels": str, "metric": {...} or None, "metric_error": str}``
    (plus ``literal_agreement`` where the CPU's int8 kernels saturate, see
    :func:`saturating_kernels_note`) and prints them.
    """
    from tqdm import tqdm

    from .artifacts import kernel_summary

    runner = runner_for(fmt, path, threads)
    reference, outputs = [], []
    for batch in tqdm(batches, desc=f"check {os.path.basename(path)}", disable=not progress):
        reference.append(_outputs(qmodel, batch)[0].numpy())
        outputs.append(np.asarray(runner(*batch)[0]))
    result = {"agreement": agreement(reference, outputs), "kernels": kernel_summary(fmt, runner),
              "metric": None, "metric_error": None}
    a = result["agreement"]
    n = sum(len(b[0]) for b in batches)
    line = f"Agreement with the fake-quantized PyTorch model on {n} calibration inputs: " \
           f"relative L2 {a['rel_l2']:.3g}, max |diff| {a['max_abs']:.3g}"
    if "top1_agreement" in a:
        line += f", top-1 agreement {100 * a['top1_agreement']:.2f} %"
    print(line, flush=True)
    note, literal = saturating_kernels_note(fmt, path, batches, reference, threads)
    if note:
        result["literal_agreement"] = literal
        print(note, flush=True)
    print(result["kernels"], flush=True)
    if task is not None:
        try:
            with torch.no_grad():
                result["metric"] = task.evaluate(ArtifactModel(runner))
        except Exception as exc:  # noqa: BLE001 -- reported: the task's evaluation may need more than a forward
            result["metric_error"] = f"{type(exc).__name__}: {exc}"
            print(f"{task.name}: the task metric could not be computed on the artifact "
                  f"({result['metric_error']}).", flush=True)
        else:
            print(f"{task.name}: artifact {task.metric}={result['metric'][task.metric]:.3f} "
                  "(evaluation split)", flush=True)
    return result
