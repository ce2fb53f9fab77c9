"""``esc-quantize export model_w8a8.nemo``: a quantized ``.nemo`` through NeMo's exporter.

The graph is NeMo's (``forward_for_export``: encoder + decoder on the
preprocessor's features, inputs ``audio_signal`` (batch x features x time) and
``length``), written by :func:`esc_plugin.nemo.export.export_quantized_asr_model`.
A ``.nemo`` holds no calibration audio, so ``--check`` compares the artifact
with the fake-quantized model on NeMo's own export example (``input_example()``:
random features), and there is no task metric to report.
"""

import numpy as np
import torch

from .artifacts import finish_tensorrt, runner_for


def _logprobs(qmodel, feats, lens):
    with torch.no_grad():
        return qmodel(processed_signal=feats, processed_signal_length=lens)[0].numpy()


def export_nemo(request, check=False):
    """Restore the quantized ``.nemo`` of ``request``, write its artifact, optionally check it."""
    from esc_plugin.nemo import export_quantized_asr_model, restore_quantized_asr_model
    from esc_plugin.nemo.export import export_example, feature_frames

    from .artifacts import kernel_summary, write_onnx_artifact
    from .check import agreement, saturating_kernels_note

    print(f"Restoring {request.source} (NeMo) ...", flush=True)
    qmodel = restore_quantized_asr_model(request.source).eval()
    seconds = request.max_audio_seconds
    example = tuple(export_example(qmodel, feature_frames(qmodel, seconds)))[:2]
    # NeMo's export example (random features) also probes OpenVINO's fusions: a .nemo holds no audio.
    files, barriers = write_onnx_artifact(request.fmt, request.out, lambda path: export_quantized_asr_model(
        qmodel, path, mode=request.mode, clip_activations=request.clip_activations,
        max_audio_seconds=seconds), probe_inputs=[example])
    result = {"files": files, "artifact": request.out}
    if barriers is not None:
        result["fusion_barriers"] = barriers
    onnx_path = files[0]
    if request.fmt == "tensorrt":
        finish_tensorrt(result, onnx_path, example, request.out, qmodel)
    if check and result["artifact"]:
        runner = runner_for(request.fmt, result["artifact"], request.threads)
        ref = _logprobs(qmodel, *example)
        got = np.asarray(runner(*example)[0])
        a = agreement([ref.reshape(len(ref), -1)], [got.reshape(len(got), -1)])
        print(f"Agreement with the fake-quantized NeMo model on NeMo's export example (random features; "
              f"a .nemo holds no calibration audio): relative L2 {a['rel_l2']:.3g}, max |diff| "
              f"{a['max_abs']:.3g}", flush=True)
        note, literal = saturating_kernels_note(request.fmt, result["artifact"], [example], [ref], request.threads)
        if note:
            print(note, flush=True)
        kernels = kernel_summary(request.fmt, runner)
        print(kernels, flush=True)
        result["check"] = {"agreement": a, "kernels": kernels, "metric": None,
                           "metric_error": "a .nemo holds no evaluation data"}
        if literal is not None:
            result["check"]["literal_agreement"] = literal
    return result
