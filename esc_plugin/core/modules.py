"""Insert quantizers into a model: module wrappers.

Both mechanisms preserve the original class (``isinstance`` still holds) and
the state-dict keys of the weights:

* ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.LayerNorm`` get a
  subclass whose forward quantizes the input (per tensor) and the weight
  (per output channel); here.
* Modules that apply their own 2-D parameters with ``F.linear`` (SpeechBrain
  ``RelPosMHAXL.in_proj_weight``, ``nn.MultiheadAttention``) get a subclass
  whose forward routes ``F.linear`` through quantizers while it runs: in
  :mod:`esc_plugin.core.functional`, whose names (``wrap_functional``,
  ``FunctionalLinearMixin``, ``keep_transformer_layers_unfused``, ...) are still
  importable from here.

Example
-------
>>> import torch
>>> lin = wrap_module(torch.nn.Linear(4, 3), "lin", weight_bits=8, act_bits=8)
>>> type(lin.module).__name__, isinstance(lin.module, torch.nn.Linear), lin.op
('QuantLinear', True, 'linear')
"""
import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizers import ActivationQuantizer, calibrate_weight, weight_quantizer

_ORIG_LINEAR = F.linear
_STATE = threading.local()


def in_quantized_op():
    """True while a quantized op runs (used by the coverage report)."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def _quantized_op():
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@dataclass
class QuantPoint:
    """One quantized op: its input quantizer and how to recompute its output.

    ``output(x, quantize_weight)`` applies the op to ``x`` with the FP32 or the
    fake-quantized weight; the ESC local search uses it on cached inputs.
    """

    name: str
    op: str
    module: nn.Module
    input_quantizer: ActivationQuantizer
    output: Callable[[torch.Tensor, bool], torch.Tensor]
    row_features: Optional[int] = None  # inputs can be flattened to rows of this size


class _CachedWeight:
    """Fake-quantized weight, recomputed only when the weight changes.

    The quantized weight does not depend on the activation scales, so the
    CMA-ES loop must not recompute it hundreds of times. Tracing (ONNX export)
    and autograd always recompute (QDQ nodes in the graph, gradients to the weight).

    Safe for one model run from several threads: an entry is one immutable
    ``(key, tensor)`` tuple, read once and replaced whole, so a thread sees either
    the old or the new entry, never a key of one with the tensor of the other.
    A weight quantizer's amax is assumed fixed once calibrated (modelopt updates
    it in place, invisibly to the key): whoever changes it must drop
    ``module.__dict__["_esc_qweight_cache"]``.
    """

    @staticmethod
    def get(module, attr, weight, quantizer):
        if not quantizer.is_enabled:
            return weight
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.is_grad_enabled():
            return quantizer(weight)
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        cache = module.__dict__.setdefault("_esc_qweight_cache", {})
        entry = cache.get(attr)
        if entry is None or entry[0] != key:
            entry = (key, quantizer(weight).detach())
            cache[attr] = entry
        return entry[1]


class QuantMixin:
    """Common part of the wrapped Linear / Conv / LayerNorm classes."""

    esc_op = None

    def esc_init(self, name, weight_bits, act_bits):
        self.input_quantizer = ActivationQuantizer(act_bits, name)
        if self.esc_op != "layer_norm":
            self.weight_quantizer = weight_quantizer(weight_bits)
            calibrate_weight(self.weight_quantizer, self.weight)

    def esc_weight(self, quantize=True):
        if self.esc_op == "layer_norm" or not quantize:
            return self.weight
        return _CachedWeight.get(self, "weight", self.weight, self.weight_quantizer)

    def forward(self, x):
        with _quantized_op():
            return self.esc_apply(self.input_quantizer(x), self.esc_weight())


class QuantLinear(QuantMixin):
    esc_op = "linear"

    def esc_apply(self, x, weight):
        return _ORIG_LINEAR(x, weight, self.bias)


class QuantConv(QuantMixin):
    """Quantizes in ``_conv_forward``, the call every torch ``ConvNd.forward`` ends in.

    The original class's ``forward`` still runs, so subclasses that pad or
    cache before convolving (NeMo's ``CausalConv1D``, streaming convolutions)
    keep doing so; the input quantizer sees the tensor actually convolved.
    """

    esc_op = "conv"

    def forward(self, *args, **kwargs):
        with _quantized_op():
            return super(QuantMixin, self).forward(*args, **kwargs)

    def _conv_forward(self, x, weight, bias):
        weight = self.esc_weight() if weight is self.weight else self.weight_quantizer(weight)
        return super()._conv_forward(self.input_quantizer(x), weight, bias)

    def esc_apply(self, x, weight):
        return super()._conv_forward(x, weight, self.bias)


class QuantLayerNorm(QuantMixin):
    esc_op = "layer_norm"

    def esc_apply(self, x, weight):
        return F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)


class QuantEmbedding:
    """Weight-only ``nn.Embedding`` (``QuantConfig(quantize_embeddings=True)``).

    A table lookup has no arithmetic on its input, so there is no activation
    quantizer; the table is stored per row in ``weight_bits`` (a deployment
    saving: Whisper's positional table is 2.3 MB of its 33 MB encoder in FP32).
    """

    def esc_init_embedding(self, weight_bits):
        self.weight_quantizer = weight_quantizer(weight_bits)
        calibrate_weight(self.weight_quantizer, self.weight)

    def forward(self, input):
        weight = _CachedWeight.get(self, "weight", self.weight, self.weight_quantizer)
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


def embedding_quantizable(module):
    """A plain ``nn.Embedding`` (or a subclass keeping its forward) without ``max_norm``
    (which renormalises the table in place at lookup)."""
    return (isinstance(module, nn.Embedding) and not isinstance(module, QuantEmbedding)
            and type(module).forward is nn.Embedding.forward and module.max_norm is None)


def wrap_embedding(module, weight_bits):
    module.__class__ = _subclass(QuantEmbedding, type(module))
    module.esc_init_embedding(weight_bits)
    return module


_WRAPPERS = ((nn.Linear, QuantLinear), (nn.Conv1d, QuantConv), (nn.Conv2d, QuantConv),
             (nn.LayerNorm, QuantLayerNorm))
_SUBCLASS_CACHE = {}


def _subclass(mixin, cls, prefix="Quant"):
    """A cached ``<prefix><cls>`` class combining our mixin with the original class."""
    key = (mixin, cls)
    if key not in _SUBCLASS_CACHE:
        _SUBCLASS_CACHE[key] = type(prefix + cls.__name__, (mixin, cls), {"__module__": __name__})
    return _SUBCLASS_CACHE[key]


def wrap_module(module, name, weight_bits, act_bits):
    """Swap ``module``'s class in place for its quantized subclass; returns the QuantPoint."""
    for base, mixin in _WRAPPERS:
        if isinstance(module, base):
            break
    else:
        raise TypeError(f"{type(module).__name__} has no quantized wrapper")
    module.__class__ = _subclass(mixin, type(module))
    module.esc_init(name, weight_bits, act_bits)
    op = "conv{}d".format(module.weight.dim() - 2) if mixin is QuantConv else mixin.esc_op
    rows = module.in_features if mixin is QuantLinear else (
        module.normalized_shape[-1] if mixin is QuantLayerNorm and len(module.normalized_shape) == 1 else None)

    def output(x, quantize_weight, m=module):
        return m.esc_apply(x, m.esc_weight(quantize_weight))

    return QuantPoint(name, op, module, module.input_quantizer, output, rows)


def wrappable(module):
    return any(isinstance(module, base) and not isinstance(module, QuantMixin)
               and not own_forward_skipped(module) for base, _ in _WRAPPERS)


def own_forward_skipped(module):
    """A Linear / LayerNorm subclass with its own ``forward``: the wrapper would replace it.

    (Conv subclasses are fine: :class:`QuantConv` keeps their ``forward``.)
    Such modules stay in float and are listed in the coverage report.
    """
    for base in (nn.Linear, nn.LayerNorm):
        if isinstance(module, base) and not isinstance(module, QuantMixin):
            return type(module).forward is not base.forward
    return False


# Moved to .functional / .patching and still importable from here. Resolved at first use:
# .functional imports this module, so importing it here would be circular.
_MOVED = {name: ("functional", name) for name in (
    "FunctionalLinearMixin", "UnfusedTransformerMixin", "keep_transformer_layers_unfused", "_safe",
    "functional_params", "functional_children", "uses_functional_weights", "wrap_functional",
    "_patched_linear", "_dispatch_linear")}
_MOVED["_mha_fastpath_off"] = ("patching", "mha_fastpath_off")


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    module, attr = _MOVED[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)
