"""Export a quantized model to ONNX with QuantizeLinear / DequantizeLinear nodes: the driver.

>>> path = export_qdq_onnx(qmodel, (x,), "model.onnx", ["feats"], ["logits"],
...                        dynamic_axes={"feats": {0: "batch", 2: "time"},
...                                      "logits": {0: "batch", 1: "time"}})   # doctest: +SKIP

What the graph holds (``mode="qdq"``, the default):

* every quantized weight: an int8 initializer (its codes) ``-> DequantizeLinear``
  with a per-output-channel scale (1-D, ``axis`` attribute, length = output
  channels) and an int8 zero point of zeros, so the file holds int8 weights
  (``int8_weights=False`` keeps ``W (float) -> QuantizeLinear -> DequantizeLinear``,
  which runtimes fold to the same thing at load), stored in the layout its op
  reads (a Linear's weight transposed once, not a Transpose node), with each
  distinct scale and zero point stored once (:mod:`esc_plugin.export.compact`);
* every quantized activation: ``x -> QuantizeLinear -> DequantizeLinear`` with a
  scalar scale ``amax / 127`` and an int8 zero point 0, on the input of the op;
* everything else in float. This is the "explicit quantization" layout
  TensorRT's strongly typed networks and ONNX Runtime's QDQ fusions consume.

This module checks that a model can be exported (:func:`check_exportable`) and
runs the exporter; how each quantizer traces (Q/DQ symbolics, narrow range,
the ``simulation`` / ``weight_only`` modes, attention projections) is
:mod:`esc_plugin.export.qdq`; the graph rewriting and inspection helpers are
:mod:`esc_plugin.export.graph`. All their public names are re-exported here.

How: the graph is produced by the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``) inside
:func:`~esc_plugin.export.qdq.export_context`.

Why not the dynamo exporter (the default of ``torch.onnx.export`` since torch
2.9): it goes through ``torch.export``, which ignores ``autograd.Function``
``symbolic`` methods, so no Q/DQ node can come from them. Checked with torch
2.14 / modelopt 0.47: ``torch.export.export`` of a quantized model stops with
``GuardOnDataDependentSymNode`` inside modelopt's CPU fake quantization
(``legacy_quant_func``: data-dependent branches on ``amax``), and
``torch.onnx.export(..., dynamo=True)`` also needs ``onnxscript`` (not a
dependency here). Every export is checked: a ``qdq`` export of a model with
enabled quantizers whose graph has no QuantizeLinear raises.

INT4: ``act_bits=4`` cannot be exported as ``qdq`` (ONNX Runtime's QDQ fusions
and TensorRT run int8 activations, there are no INT4 activation kernels): the
error names the fixes. 4-bit weights export as int8 Q/DQ (see
:mod:`esc_plugin.export.qdq`).
"""
import os
import warnings
from collections import Counter

import torch

from esc_plugin.core.io import atomic_path

from .errors import ExportError
from .compact import int8_weight_layout
from .graph import METADATA_PREFIX, QDQ_OPS, count_qdq, export_metadata, fold_weight_quantizers, op_counts, qdq_nodes
from .qdq import MODES, ZERO_AMAX, _quantizers, export_context

__all__ = ["MODES", "ZERO_AMAX", "QDQ_OPS", "METADATA_PREFIX", "check_exportable", "export_context",
           "export_qdq_onnx", "fold_weight_quantizers", "op_counts", "count_qdq", "export_metadata", "qdq_nodes"]


# ---------------------------------------------------------------- checks

def _plan(qmodel):
    plan = qmodel.__dict__.get("esc_plan") if isinstance(qmodel, torch.nn.Module) else None
    if plan is None:
        raise ExportError(
            f"{type(qmodel).__name__} was never quantized (it has no esc_plan): call "
            "esc.quantize(model, config, forward_loop, objective) first and export the model it "
            "returns (or esc.load(model, 'quantized.pt') to rebuild it from a saved state)."
        )
    return plan


def check_exportable(qmodel, mode="qdq"):
    """Raise :class:`ExportError` (with the fix) if ``qmodel`` cannot be exported in ``mode``.

    Returns the model's :class:`~esc_plugin.core.plan.QuantPlan`.
    """
    if mode not in MODES:
        raise ExportError(f"mode={mode!r} is unknown: choose one of {', '.join(MODES)}.")
    plan = _plan(qmodel)
    wbits, abits = plan.config.weight_bits, plan.config.act_bits
    if mode == "qdq" and abits == 4:
        raise ExportError(
            f"act_bits=4 (W{wbits}A4) cannot be exported as an int8 QDQ graph: ONNX Runtime and "
            "TensorRT have no INT4 activation kernels (their QDQ paths quantize activations to "
            "int8). Fixes: export_qdq_onnx(..., mode='simulation') writes the W4A4 fake "
            "quantization as float ONNX ops (exact numerics, for accuracy checks, no integer "
            "speed-up); mode='weight_only' exports only the weight Q/DQ; for an int8 "
            f"deployment re-quantize with esc.QuantConfig(weight_bits={wbits}, act_bits=8)."
        )
    for name, q, is_weight in _quantizers(qmodel):
        if mode == "weight_only" and not is_weight:
            continue
        kind = "weight" if is_weight else "activation"
        amax = getattr(q, "_amax", None)
        if amax is None:
            raise ExportError(
                f"{kind} quantizer '{name}' has no amax: the model is not calibrated. Export the "
                "model returned by esc.quantize (or esc.load), after calibration has finished."
            )
        values = amax.detach().float()
        if not torch.isfinite(values).all():
            raise ExportError(
                f"{kind} quantizer '{name}' has a non-finite amax ({_short(values)}): a NaN/inf "
                "scale is not a valid QuantizeLinear scale. Recalibrate with esc.quantize "
                "(check the calibration data for NaN/inf) or set a finite value with "
                "input_quantizer.set_amax(value)."
            )
        if (values < 0).any():
            raise ExportError(f"{kind} quantizer '{name}' has a negative amax ({_short(values)}): "
                              "recalibrate with esc.quantize.")
        if not is_weight and float(values.max()) <= ZERO_AMAX:
            raise ExportError(
                f"activation quantizer '{name}' has amax={float(values.max()):.3g} (zero): every "
                "input would quantize to 0 and a zero scale is not a valid QuantizeLinear scale. "
                "Recalibrate with esc.quantize on data that reaches this op with non-zero values, "
                "or leave the op in float with esc.QuantConfig(exclude=(<module name>,))."
            )
    return plan


def _short(t):
    flat = t.reshape(-1)
    return f"{flat[:4].tolist()}{'...' if flat.numel() > 4 else ''}"


# ---------------------------------------------------------------- export

def export_qdq_onnx(qmodel, example_inputs, path, input_names, output_names, dynamic_axes=None,
                    opset=17, mode="qdq", clip_activations=False, int8_weights=True):
    """Write ``qmodel`` (from ``esc.quantize``) to ``path`` as a QDQ ONNX model.

    Arguments
    ---------
    qmodel : torch.nn.Module
        A model returned by ``esc.quantize`` / ``esc.load``.
    example_inputs : tensor or tuple of tensors
        Inputs used to trace the model (any batch / time size: see ``dynamic_axes``).
    path : str
        Output file, written atomically (temp file in the same folder, then ``os.replace``).
    input_names, output_names : list of str
        ONNX names of the positional inputs and of the outputs.
    dynamic_axes : dict, optional
        ``{name: {axis: "label"}}`` as in ``torch.onnx.export``, e.g.
        ``{"feats": {0: "batch", 2: "time"}}``. Default: axis 0 (batch) of every
        input and output; give the time axes explicitly (their position depends
        on the model's layout).
    opset : int
        ONNX opset (>= 13 for per-channel QuantizeLinear; 17 default).
    mode : str
        ``"qdq"`` (int8 Q/DQ, default), ``"simulation"`` (fake quantization as
        float ops, any bit width) or ``"weight_only"``.
    clip_activations : bool
        Put ``Clip(-127 * scale, 127 * scale)`` before each activation
        QuantizeLinear, so that the graph reproduces the narrow-range
        simulation exactly (without it, values below ``-amax`` become
        ``-128 * scale``: see :mod:`esc_plugin.export.qdq`). One extra elementwise op per
        quantized activation; off by default (standard QDQ layout).

    Returns
    -------
    str
        ``path``. The file passes ``onnx.checker.check_model(full_check=True)``
        and carries metadata ``esc_plugin.mode`` / ``.weight_bits`` / ``.act_bits``.

    Example
    -------
    >>> import os, tempfile, torch, esc_plugin as esc
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> data = [torch.randn(4, 8) for _ in range(2)]
    >>> def loop(m):
    ...     for x in data: m(x)
    >>> q = esc.quantize(model, esc.QuantConfig(bits=8, method="max"), loop, progress=False)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = export_qdq_onnx(q, data[0], os.path.join(tmp.name, "m.onnx"), ["x"], ["y"])
    >>> count_qdq(path)  # 2 activations (Q + DQ) + 2 int8 weights (DQ only)
    {'QuantizeLinear': 2, 'DequantizeLinear': 4}
    >>> tmp.cleanup()
    """
    import onnx

    plan = check_exportable(qmodel, mode)
    if opset < 13:
        raise ExportError(f"opset={opset}: per-channel QuantizeLinear (axis) needs opset >= 13; use 17.")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    input_names, output_names = list(input_names), list(output_names)
    low = sorted({str(t.dtype) for t in list(example_inputs) + list(qmodel.parameters())
                  if torch.is_tensor(t) and t.is_floating_point() and t.dtype != torch.float32})
    if low:
        raise ExportError(f"the model or the example inputs are {low}: the QDQ export is float32 "
                          "(opset-17 DequantizeLinear outputs float32); export qmodel.float() with "
                          "float32 inputs (TensorRT can still run float16 around the int8 ops).")
    if len(input_names) != len(example_inputs):
        raise ExportError(f"{len(example_inputs)} example inputs but {len(input_names)} input_names "
                          f"{input_names}: give one name per positional input.")
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    unknown = sorted(set(dynamic_axes) - set(input_names) - set(output_names))
    if unknown:
        raise ExportError(f"dynamic_axes names {unknown} are neither input_names {input_names} "
                          f"nor output_names {output_names}.")

    path = os.fspath(path)
    training = qmodel.training
    try:
        with atomic_path(path) as tmp:
            qmodel.eval()
            with torch.no_grad(), export_context(qmodel, mode, clip_activations), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(qmodel, example_inputs, tmp, input_names=input_names,
                                      output_names=output_names, dynamic_axes=dynamic_axes,
                                      opset_version=opset, do_constant_folding=True, dynamo=False)
                except ExportError:
                    raise
                except Exception as exc:
                    raise ExportError(f"torch.onnx.export (TorchScript exporter, dynamo=False) failed on "
                                      f"{type(qmodel).__name__}: {type(exc).__name__}: {exc}") from exc
            model = onnx.load(tmp)
            counts = Counter(n.op_type for n in model.graph.node)
            n_quantizers = sum(1 for _, _, w in _quantizers(qmodel) if mode != "weight_only" or w)
            if mode != "simulation" and n_quantizers and not counts["QuantizeLinear"]:
                raise ExportError("the exported graph has no QuantizeLinear node although the model has "
                                  f"{n_quantizers} enabled quantizers: the fake quantization was not "
                                  "exported (was torch.onnx.export patched or run with dynamo=True?).")
            if mode == "qdq" and int8_weights:
                int8_weight_layout(model)
            meta = {"mode": mode, "weight_bits": plan.config.weight_bits,
                    "act_bits": plan.config.act_bits, "method": plan.config.method,
                    "clip_activations": bool(clip_activations),
                    "int8_weights": bool(mode == "qdq" and int8_weights)}
            for key, value in meta.items():
                entry = model.metadata_props.add()
                entry.key, entry.value = METADATA_PREFIX + key, str(value)
            onnx.checker.check_model(model, full_check=True)
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
    finally:
        qmodel.train(training)
    return path
