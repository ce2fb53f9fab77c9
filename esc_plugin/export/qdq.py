"""How a quantized model traces to ONNX: each quantizer's Q/DQ (or float simulation) form.

While :func:`export_context` is active, each enabled modelopt
``TensorQuantizer`` of the model is temporarily routed (instance attribute,
restored on exit) through :class:`_QDQ`, an autograd function whose eager
forward is exactly modelopt's fake quantization and whose ONNX ``symbolic``
emits a QuantizeLinear/DequantizeLinear pair: a per-output-channel scale (1-D,
``axis`` attribute) for weights, a scalar scale ``amax / 127`` for
activations, int8 zero points of zeros. modelopt's own symbolic
(``FakeTensorQuantFunction.symbolic`` -> ``export_onnx.export_int8``) cannot
be used here: in modelopt 0.47 it asserts ``not narrow_range`` for signed
quantizers ("ONNX does not support unsigned narrow range INT8"), and
esc_plugin's quantizers are narrow range (``[-127, 127]``, so that
``scale = amax / 127`` exactly).

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

Modes (:data:`MODES`):

* ``"qdq"``: int8 Q/DQ as above.
* ``"simulation"``: the fake quantization as float ONNX ops
  (``Mul -> Round -> Clip -> Div``, bit-exact with the PyTorch simulation,
  any bit width). For checking W4A4 accuracy in ONNX Runtime; no integer
  kernels run.
* ``"weight_only"``: Q/DQ on the weights only, activations left in float.

4-bit *weights* (W4A8) are exported exactly as int8 Q/DQ with
``scale = amax / 7`` (codes in ``[-7, 7]``): same numerics, int8 kernels, no
memory saving (real INT4 weight storage needs opset-21 INT4 or TensorRT's
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
import types

import numpy as np
import torch
from torch.onnx import symbolic_helper

from ._attention import patched_mha
from .errors import ExportError

# modelopt quantizes everything to 0 when amax <= 2**-24 (fp16's smallest subnormal).
ZERO_AMAX = 1.0 / (1 << 24)
MODES = ("qdq", "simulation", "weight_only")


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


# ---------------------------------------------------------------- quantizers of a model

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
