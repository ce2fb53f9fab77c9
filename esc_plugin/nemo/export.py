"""NeMo ``model.export("x.onnx")`` of a quantized model, with QuantizeLinear / DequantizeLinear nodes.

NeMo's exporter (``Exportable.export``: ``forward_for_export`` = encoder +
decoder, its input / output names and dynamic axes, ``torch.onnx.export(...,
dynamo=False)``) is kept; it runs inside
:func:`esc_plugin.export.export_context`, which routes each enabled quantizer
through esc_plugin's Q/DQ symbolic (modelopt's own asserts on the narrow-range
int8 quantizers esc_plugin uses). ``use_dynamo=True`` is refused: the dynamo
exporter (``torch.export``) ignores ``autograd.Function`` symbolics, so the
graph would lose every Q/DQ node. After NeMo has written the graph, the file is
checked (QuantizeLinear present unless ``mode="simulation"``,
``onnx.checker.check_model(full_check=True)``), gets esc_plugin's metadata,
and replaces ``output`` atomically.

The ONNX inputs are the preprocessor's features (``audio_signal``: batch x
features x time, ``length``), as for NeMo's FP32 export: the float
preprocessor is not part of the graph.

A Conformer's positional-encoding table is a float constant of the graph,
sized by NeMo for ``pos_emb_max_len`` encoder frames (5000 by default, a few
MB): with int8 weights it can be most of the file. ``max_audio_seconds`` sizes
it for the longest input the artifact will see (:func:`encoder_positions`,
also usable around NeMo's own FP32 export); the limit is written into the
metadata, and a longer input fails in the runtime with a shape error rather
than giving a transcript.
"""
import contextlib
import math
import os
from pathlib import Path

from ..core.io import atomic_path
from ..export import ExportError, check_exportable, export_context, op_counts
from ..export.compact import int8_weight_layout
from ..export.onnx import METADATA_PREFIX
from .model import base_export as _base_export
from .model import is_quantized_asr_model


def feature_frames(model, max_audio_seconds):
    """Feature frames of ``max_audio_seconds`` of audio for ``model``'s preprocessor (None for None).

    Checks first that the encoder has a positional-encoding table to size; an
    :class:`ExportError` naming the fix otherwise.
    """
    if max_audio_seconds is None:
        return None
    encoder = getattr(model, "encoder", None)
    pos_enc = getattr(encoder, "pos_enc", None)
    if pos_enc is None or not hasattr(pos_enc, "extend_pe") or not hasattr(encoder, "max_audio_length"):
        raise ExportError(f"max_audio_seconds: {type(encoder).__name__} has no positional-encoding table "
                          "(encoder.pos_enc, as in NeMo's ConformerEncoder); leave max_audio_seconds=None.")
    if not max_audio_seconds > 0:
        raise ExportError(f"max_audio_seconds={max_audio_seconds!r}: give the longest input in seconds, "
                          "a positive number.")
    stride = model.cfg.get("preprocessor", {}).get("window_stride", None)
    if not stride:
        raise ExportError("max_audio_seconds: the model's preprocessor config has no window_stride "
                          "(seconds per feature frame); leave max_audio_seconds=None.")
    return math.floor(max_audio_seconds / stride) + 1  # centred STFT frames


def export_example(model, frames):
    """NeMo's ``input_example()``, no longer than ``frames`` feature frames (NeMo's 256 when None):
    a longer traced example would index past a shorter positional table."""
    return model.input_module.input_example(max_batch=1, max_dim=256 if frames is None else min(frames, 256))


@contextlib.contextmanager
def encoder_positions(model, max_audio_seconds):
    """Within the block, ``model.encoder``'s positional-encoding table covers ``max_audio_seconds``.

    The table is NeMo's own (``pos_enc.extend_pe``, deterministic sinusoids, no
    learned values), rebuilt for the encoder frames of that much audio (the
    preprocessor's hop, the encoder's ``subsampling_factor``) and put back as
    it was on leaving. Yields :func:`feature_frames` (None when
    ``max_audio_seconds`` is None, which changes nothing): a traced example
    must not be longer (:func:`export_example`).

    >>> with encoder_positions(asr, max_audio_seconds=2.0) as frames:        # doctest: +SKIP
    ...     asr.export("fp32_2s.onnx", input_example=export_example(asr, frames))
    """
    frames = feature_frames(model, max_audio_seconds)
    if frames is None:
        yield None
        return
    encoder, pos_enc = model.encoder, model.encoder.pos_enc
    positions = math.ceil(frames / getattr(encoder, "subsampling_factor", 1)) + 1
    table, length = pos_enc.pe, encoder.max_audio_length
    try:
        del pos_enc.pe  # extend_pe only grows a table; without one it builds one of this length
        pos_enc.extend_pe(positions, table.device, table.dtype)
        encoder.max_audio_length = positions
        yield frames
    finally:
        pos_enc.pe, encoder.max_audio_length = table, length


def export_quantized_asr_model(qmodel, output, mode="qdq", clip_activations=False, use_dynamo=False,
                               int8_weights=True, max_audio_seconds=None, **nemo_export_args):
    """Export a quantized NeMo model with NeMo's exporter; returns NeMo's ``(outputs, descriptions)``.

    Arguments
    ---------
    qmodel : QuantizedASRModel
        From :func:`~esc_plugin.nemo.quantize_asr_model` / ``restore_quantized_asr_model``.
    output : str
        ``.onnx`` file, written atomically.
    mode, clip_activations
        As in :func:`esc_plugin.export.export_qdq_onnx` (``"qdq"`` int8 Q/DQ by default).
    use_dynamo : bool
        Must stay False (see the module doc).
    int8_weights : bool
        Store the weights as int8 codes (each constant ``W -> QuantizeLinear`` folded into an int8
        initializer, as :func:`esc_plugin.export.export_qdq_onnx` does), so the file is about a
        quarter of the FP32 one; False keeps NeMo's float weights in front of their QuantizeLinear.
    max_audio_seconds : float, optional
        Longest input the artifact must take; sizes the positional-encoding table
        (:func:`encoder_positions`). None keeps NeMo's table (``pos_emb_max_len`` frames).
    **nemo_export_args
        NeMo's ``export`` arguments (``input_example``, ``dynamic_axes``,
        ``onnx_opset_version`` (default 17), ``check_trace``...).
    """
    import onnx

    if not is_quantized_asr_model(qmodel):
        raise ExportError(f"{type(qmodel).__name__} is not quantized by esc_plugin.nemo: export FP32 "
                          "models with NeMo's model.export, quantized ones after quantize_asr_model.")
    if use_dynamo:
        raise ExportError("use_dynamo=True goes through torch.export, which ignores the Q/DQ symbolics "
                          "of the fake quantization (no QuantizeLinear would be written): leave "
                          "use_dynamo=False (NeMo's default, the TorchScript exporter).")
    output = os.fspath(output)
    if Path(output).suffix != ".onnx":
        raise ExportError(f"{output}: a quantized model exports to ONNX only (.onnx); TorchScript "
                          "would keep the fake quantization as float ops, with no Q/DQ nodes.")
    if qmodel.list_export_subnets() != ["self"]:
        raise ExportError(f"{type(qmodel).__name__} exports several sub-networks "
                          f"{qmodel.list_export_subnets()}; esc_plugin.nemo exports single-graph CTC models.")
    plan = check_exportable(qmodel, mode)
    if (nemo_export_args.get("onnx_opset_version") or 17) < 13:
        raise ExportError("onnx_opset_version < 13: per-channel QuantizeLinear needs opset >= 13; use 17.")
    training = qmodel.training
    requires_grad = {name: p.requires_grad for name, p in qmodel.named_parameters()}
    try:
        with atomic_path(output) as tmp:
            with export_context(qmodel, mode, clip_activations), \
                    encoder_positions(qmodel, max_audio_seconds) as frames:
                if frames is not None and nemo_export_args.get("input_example") is None:
                    nemo_export_args["input_example"] = export_example(qmodel, frames)
                outputs, descriptions = _base_export(qmodel)(tmp, use_dynamo=False, **nemo_export_args)
            graph = onnx.load(tmp)
            n_quantize = op_counts(graph).get("QuantizeLinear", 0)
            if mode != "simulation" and not n_quantize:
                raise ExportError("NeMo's export wrote no QuantizeLinear node although the model is "
                                  "quantized: the fake quantization was not exported (was "
                                  "torch.onnx.export patched, or dynamo used?).")
            folded = int8_weight_layout(graph)["folded"] if mode == "qdq" and int8_weights else 0
            meta = {"mode": mode, "weight_bits": plan.config.weight_bits, "act_bits": plan.config.act_bits,
                    "method": plan.config.method, "clip_activations": bool(clip_activations),
                    "exporter": "nemo", "int8_weights": bool(folded)}
            if frames is not None:
                meta.update(max_audio_seconds=max_audio_seconds, max_feature_frames=frames)
            for key, value in meta.items():
                entry = graph.metadata_props.add()
                entry.key, entry.value = METADATA_PREFIX + key, str(value)
            onnx.checker.check_model(graph, full_check=True)
            with open(tmp, "wb") as f:
                f.write(graph.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
    finally:
        # NeMo's export turns off requires_grad and sets eval(); give the model back as it was.
        for name, p in qmodel.named_parameters():
            p.requires_grad_(requires_grad[name])
        qmodel.train(training)
    return [output] * len(outputs), descriptions
