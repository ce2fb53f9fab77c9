"""Export a quantized model to ONNX with QuantizeLinear / DequantizeLinear nodes.

>>> path = export_qdq_onnx(qmodel, (x,), "model.onnx", ["feats"], ["logits"],
...                        dynamic_axes={"feats": {0: "batch", 2: "time"},
...                                      "logits": {0: "batch", 1: "time"}})   # doctest: +SKIP

What the graph holds (``mode="qdq"``, the default):

* every quantized weight: an int8 initializer (its codes) ``-> DequantizeLinear``
  with a per-output-channel scale (1-D, ``axis`` attribute, length = output
  channels) and an int8 zero point of zeros, so the file holds int8 weights
  (``int8_weights=False`` keeps ``W (float) -> QuantizeLinear -> DequantizeLinear``,
  which runtimes fold to the same thing at load);
* every quantized activation: ``x -> QuantizeLinear -> DequantizeLinear`` with a
  scalar scale ``amax / 127`` and an int8 zero point 0, on the input of the op;
* everything else in float. This is the "explicit quantization" layout
  TensorRT's strongly typed networks and ONNX Runtime's QDQ fusions consume.

How: the graph is produced by the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``), with each enabled modelopt
``TensorQuantizer`` temporarily routed (instance attribute, restored on exit)
through :class:`_QDQ`, an autograd function whose eager forward is exactly
modelopt's fake quantization and whose ONNX ``symbolic`` emits the Q/DQ pair.
modelopt's own symbolic (``FakeTensorQuantFunction.symbolic`` ->
``export_onnx.export_int8``) cannot be used here: in modelopt 0.47 it asserts
``not narrow_range`` for signed quantizers ("ONNX does not support unsigned
narrow range INT8"), and esc_plugin's quantizers are narrow range
(``[-127, 127]``, so that ``scale = amax / 127`` exactly).

Narrow range in ONNX: QuantizeLinear saturates to ``[-128, 127]``; ONNX has no
narrow-range option. Weights are unaffected (the per-channel scale is the
channel's max, every code is in ``[-127, 127]``; the exporter also clamps the
weight to ``[-amax, amax]`` before Q, which constant folding removes). An
activation below ``-amax`` becomes ``-128 * scale`` in ONNX Runtime / TensorRT
instead of ``-127 * scale`` in the PyTorch simulation: one quantization step,
only on clipped negative values. This happens even on the calibration data
(an op's input in the quantized model exceeds the FP32 max it was calibrated
on, because the ops before it are quantized), and is the main difference
between the simulation and ONNX Runtime. ``clip_activations=True`` adds a
``Clip(-127 * scale, 127 * scale)`` before each activation Q, which makes the
graph match the simulation to float rounding, at the cost of one elementwise
op per activation (ONNX Runtime keeps it: its Clip/Q fusion only removes a
Clip that covers the whole int8 range; a ``Conv -> Clip -> Q`` is then no
longer fused into ``QLinearConv``).

Why not the dynamo exporter (the default of ``torch.onnx.export`` since torch
2.9): it goes through ``torch.export``, which ignores ``autograd.Function``
``symbolic`` methods, so no Q/DQ node can come from them. Checked with torch
2.14 / modelopt 0.47: ``torch.export.export`` of a quantized model stops with
``GuardOnDataDependentSymNode`` inside modelopt's CPU fake quantization
(``legacy_quant_func``: data-dependent branches on ``amax``), and
``torch.onnx.export(..., dynamo=True)`` also needs ``onnxscript`` (not a
dependency here). Every export is checked: a ``qdq`` export of a model with
enabled quantizers whose graph has no QuantizeLinear raises.

Other modes:

* ``mode="simulation"``: the fake quantization as float ONNX ops
  (``Mul -> Round -> Clip -> Div``, bit-exact with the PyTorch simulation,
  any bit width). For checking W4A4 accuracy in ONNX Runtime; no integer
  kernels run.
* ``mode="weight_only"``: Q/DQ on the weights only, activations left in float.

INT4: ``act_bits=4`` cannot be exported as ``qdq`` (ONNX Runtime's QDQ fusions
and TensorRT run int8 activations, there are no INT4 activation kernels): the
error names the fixes. 4-bit *weights* (W4A8) are exported exactly as int8 Q/DQ
with ``scale = amax / 7`` (codes in ``[-7, 7]``): same numerics, int8 kernels,
no memory saving (real INT4 weight storage needs opset-21 INT4 or TensorRT's
block-quantized weight path).

Attention projections applied through ``F.linear`` (``nn.MultiheadAttention``,
SpeechBrain ``RelPosMHAXL``): in the simulation, ``FunctionalLinearMixin``
quantizes the whole packed parameter and takes the call's rows with
``as_strided``, which does not export: the TorchScript exporter (torch 2.14)
fails with ``RuntimeError: required keyword attribute 'value' is undefined``
on ``aten::as_strided``. During export :func:`export_context` instead
quantizes the parameter's row slice (cut with constant bounds, so it is folded
into an initializer) with the matching rows of the per-channel amax, which is
the same arithmetic (per-output-channel quantization is row-wise): each
projection becomes ``W[rows] (initializer) -> Q -> DQ -> MatMul``.

``nn.MultiheadAttention`` itself does not trace with a dynamic sequence length
(its reshapes keep the example's length, FP32 model included), so
:func:`export_context` also swaps ``F.multi_head_attention_forward`` for a
shape-free version (:mod:`esc_plugin.export._attention`). SpeechBrain's
``RelPosMHAXL`` / ``ConformerEncoder`` trace with dynamic batch and time as is.
"""
import contextlib
import os
import types
import warnings
from collections import Counter

import numpy as np
import torch
from torch.onnx import symbolic_helper

from esc_plugin.core.io import atomic_path

from ._attention import patched_mha
from .errors import ExportError

# modelopt quantizes everything to 0 when amax <= 2**-24 (fp16's smallest subnormal).
ZERO_AMAX = 1.0 / (1 << 24)
MODES = ("qdq", "simulation", "weight_only")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
METADATA_PREFIX = "esc_plugin."


# ---------------------------------------------------------------- fake quant ops

def _constant(t):
    """A copy of ``t`` the tracer does not know about, so it lands in the graph as a constant
    (``amax[rows]`` of a buffer would otherwise be traced as a Slice)."""
    return torch.from_numpy(t.detach().cpu().float().numpy().copy())


def _inverse_scales(amax, qmax):
    """modelopt's arithmetic: ``x * (qmax / amax)``, round, clamp, ``/ (qmax / amax)``;
    an amax <= 2**-24 maps every value to 0. Returns (multiplier, divisor)."""
    zero = amax <= ZERO_AMAX
    inv = torch.where(zero, torch.zeros_like(amax), qmax / amax.clamp_min(ZERO_AMAX))
    div = torch.where(zero, torch.ones_like(amax), inv)
    return inv, div


def _simulate(x, inv, div, qmin, qmax):
    return torch.clamp(torch.round(x * inv), qmin, qmax) / div


class _QDQ(torch.autograd.Function):
    """Fake quantization whose ONNX form is a QuantizeLinear/DequantizeLinear pair."""

    @staticmethod
    def forward(ctx, x, inv, div, scale, axis, qmin, qmax, clip):
        return _simulate(x, inv, div, qmin, qmax).to(x.dtype)

    @staticmethod
    @symbolic_helper.parse_args("v", "t", "t", "t", "i", "i", "i", "b")
    def symbolic(g, x, inv, div, scale, axis, qmin, qmax, clip):
        scale_c = g.op("Constant", value_t=scale)
        zero_c = g.op("Constant", value_t=torch.zeros(scale.shape, dtype=torch.int8))
        attrs = {"axis_i": axis} if scale.dim() == 1 else {}
        if clip and scale.dim() == 0:  # narrow range: [qmin, qmax] * scale before Q
            lo = g.op("Constant", value_t=(scale * qmin).to(torch.float32))
            hi = g.op("Constant", value_t=(scale * qmax).to(torch.float32))
            x = g.op("Clip", x, lo, hi).setType(x.type())
        quantized = g.op("QuantizeLinear", x, scale_c, zero_c, **attrs)
        return g.op("DequantizeLinear", quantized, scale_c, zero_c, **attrs).setType(x.type())


def _onnx_scale(amax, x, qmax, name):
    """(scale, axis) of a QuantizeLinear: a scalar, or a 1-D per-channel vector and its axis."""
    amax = amax.float().cpu()
    channels = [i for i, n in enumerate(amax.shape) if n != 1]
    if not channels:
        return (amax.reshape(()) / qmax), -1
    if len(channels) > 1:
        raise ExportError(f"quantizer '{name}' has an amax of shape {tuple(amax.shape)}: ONNX "
                          "QuantizeLinear supports one quantization axis (per-tensor or per-channel).")
    axis = channels[0] + x.dim() - amax.dim()
    scale = amax.reshape(-1) / qmax
    # A channel whose weights are all zero: any scale gives exactly 0; 1.0 keeps the scale valid.
    scale = torch.where(amax.reshape(-1) <= ZERO_AMAX, torch.ones_like(scale), scale)
    return scale, axis


def _export_fake_quantize(quantizer, x, mode, is_weight, name, amax=None, clip=False):
    """What a quantizer does while exporting (replaces ``TensorQuantizer._fake_quantize``)."""
    if mode == "weight_only" and not is_weight:
        return x
    if amax is None:
        amax = quantizer._get_amax(x)
    amax = _constant(amax).to(x.device)
    qmax = 2 ** (quantizer.num_bits - 1) - 1
    qmin = -qmax if quantizer.narrow_range else -qmax - 1
    inv, div = _inverse_scales(amax, qmax)
    if mode == "simulation":
        return _simulate(x, inv, div, qmin, qmax).to(x.dtype)
    if is_weight:
        _check_weight_within_amax(x, amax, name)
    scale, axis = _onnx_scale(amax, x, qmax, name)
    clip = bool(clip and not is_weight and qmin > -qmax - 1)
    return _QDQ.apply(x, inv, div, scale, axis, qmin, qmax, clip)


def _check_weight_within_amax(weight, amax, name):
    """ONNX QuantizeLinear saturates to [-128, 127], not to [-amax, amax]: the export is
    exact only if every weight is within its channel's amax, which holds for weights
    calibrated by esc.quantize / esc.load (amax = channel max) and not for weights
    edited afterwards. Checked eagerly (numpy, nothing is added to the trace)."""
    w = weight.detach().cpu().float().numpy()
    a = amax.cpu().float().numpy()
    a = a.reshape(a.shape + (1,) * (w.ndim - a.ndim)) if a.ndim < w.ndim and a.size > 1 else a
    if np.any(np.abs(w) > a * (1 + 1e-6) + 1e-12):
        raise ExportError(
            f"weight quantizer '{name}': some weights exceed their calibrated amax, so the "
            "model's weights changed after quantization. Re-run esc.quantize (or esc.load on the "
            "current FP32 weights) before exporting."
        )


# ---------------------------------------------------------------- model inspection

def _quantizer_classes():
    from ..core.quantizers import ActivationQuantizer, TensorQuantizer
    return ActivationQuantizer, TensorQuantizer


def _quantizers(qmodel):
    """(name, quantizer, is_weight) for every enabled quantizer of ``qmodel``."""
    act_cls, tq_cls = _quantizer_classes()
    out = []
    for name, module in qmodel.named_modules():
        if isinstance(module, tq_cls) and module.is_enabled:
            is_weight = not isinstance(module, act_cls)
            out.append((module.esc_name if not is_weight and module.esc_name else name, module, is_weight))
    return out


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


@contextlib.contextmanager
def export_context(qmodel, mode="qdq", clip_activations=False):
    """While active, ``qmodel``'s quantizers trace to ONNX in ``mode`` (see the module doc).

    Instance attributes are set on the quantizers and on the ``F.linear`` modules
    (and ``F.multi_head_attention_forward`` is swapped if the model has an
    ``nn.MultiheadAttention``), all restored on exit. Eager results inside the
    context equal those outside: the fake quantization is bit-exact with
    modelopt's, the attention equal up to float rounding.
    """
    patched = []
    try:
        for name, q, is_weight in _quantizers(qmodel):
            q.__dict__["_fake_quantize"] = types.MethodType(
                lambda self, x, _w=is_weight, _n=name: _export_fake_quantize(
                    self, x, mode, _w, _n, clip=clip_activations), q)
            patched.append((q, "_fake_quantize"))
        from ..core.modules import FunctionalLinearMixin
        for module in qmodel.modules():
            if isinstance(module, FunctionalLinearMixin):
                module.__dict__["esc_qweight_view"] = types.MethodType(
                    lambda self, pname, weight: _row_slice_qweight(self, pname, weight, mode), module)
                patched.append((module, "esc_qweight_view"))
        with contextlib.ExitStack() as stack:
            if any(isinstance(m, torch.nn.MultiheadAttention) for m in qmodel.modules()):
                stack.enter_context(patched_mha())
            yield qmodel
    finally:
        for obj, attr in patched:
            obj.__dict__.pop(attr, None)


def _row_slice_qweight(module, pname, weight, mode):
    """Quantized rows of a functional weight, without ``as_strided`` (see the module doc)."""
    from ..core.modules import _safe
    param = module.get_parameter(pname)
    quantizer = module.esc_weight_quantizers[_safe(pname)]
    if not quantizer.is_enabled:
        return weight
    rows = param.shape[1] if param.dim() == 2 else None
    offset = weight.storage_offset() - param.storage_offset()
    if (weight.dim() != 2 or weight.stride() != param.stride() or weight.shape[1] != param.shape[1]
            or rows is None or offset % rows):
        raise ExportError(
            f"{module.esc_name}: F.linear was called on a view of '{pname}' that is not a block of "
            f"whole rows (size {tuple(weight.shape)}, stride {tuple(weight.stride())}), which the "
            "ONNX export cannot express as a per-channel Q/DQ; exclude this module with "
            "esc.QuantConfig(exclude=...)."
        )
    start, stop = offset // rows, offset // rows + int(weight.shape[0])
    amax = quantizer._amax[start:stop]
    # Slice the parameter with constant bounds (the view F.linear received was cut with
    # sizes traced from the input's shape, which constant folding cannot remove).
    rows_of_param = param[start:stop] if (start, stop) != (0, param.shape[0]) else param
    return _export_fake_quantize(quantizer, rows_of_param, mode, True,
                                 f"{module.esc_name}.{pname}[{start}:{stop}]", amax=amax)


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
        ``-128 * scale``: see the module doc). One extra elementwise op per
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
                fold_weight_quantizers(model)
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


def _constant_values(model):
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def fold_weight_quantizers(model):
    """Turn every ``initializer -> QuantizeLinear`` of ``model`` (an ONNX ModelProto,
    changed in place) into an int8 initializer holding the codes.

    ONNX QuantizeLinear is ``saturate(round_half_even(x / scale) + zero_point)``;
    it is evaluated here with numpy in float32, which is what ONNX Runtime's
    constant folding computes too. Returns the number of folded weights.
    """
    import numpy as np
    from onnx import numpy_helper

    values = _constant_values(model)
    weights = {t.name for t in model.graph.initializer}
    kept, folded = [], []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in weights:
            kept.append(node)
            continue
        w, scale = values[node.input[0]], values[node.input[1]]
        zero = values[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int8)
        if zero.dtype != np.int8:
            raise ExportError(f"{node.name}: zero point of type {zero.dtype}; only int8 weights are folded.")
        if scale.ndim == 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        q = np.clip(np.rint(w / scale) + zero.astype(np.float32), -128, 127).astype(np.int8)
        folded.append(numpy_helper.from_array(q, node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    initializers = [t for t in model.graph.initializer if t.name in used] + folded
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    return len(folded)


# ---------------------------------------------------------------- inspection helpers

def _load(path_or_model):
    import onnx
    if isinstance(path_or_model, (str, os.PathLike)):
        return onnx.load(os.fspath(path_or_model))
    return path_or_model


def op_counts(path_or_model):
    """Counter of node op types in the main graph."""
    return Counter(n.op_type for n in _load(path_or_model).graph.node)


def count_qdq(path_or_model):
    """``{"QuantizeLinear": n, "DequantizeLinear": m}`` of an ONNX file (or ModelProto)."""
    counts = op_counts(path_or_model)
    return {op: counts.get(op, 0) for op in QDQ_OPS}


def export_metadata(path_or_model):
    """The ``esc_plugin.*`` metadata written by :func:`export_qdq_onnx` (keys without the prefix)."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in _load(path_or_model).metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def qdq_nodes(path_or_model):
    """One dict per QuantizeLinear / DequantizeLinear node: ``op``, ``name``, ``input``,
    ``axis`` (None if absent), ``scale`` and ``zero_point`` (numpy arrays, None if not constant)."""
    model = _load(path_or_model)
    consts = _constant_values(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in QDQ_OPS:
            continue
        attrs = {a.name: a.i for a in n.attribute if a.name == "axis"}
        out.append({
            "op": n.op_type, "name": n.name, "input": n.input[0],
            "axis": attrs.get("axis"),
            "scale": consts.get(n.input[1]),
            "zero_point": consts.get(n.input[2]) if len(n.input) > 2 else None,
        })
    return out
