"""Insert quantizers into a model: module wrappers and functional linear calls.

Two mechanisms, both preserving the original class (``isinstance`` still
holds) and the state-dict keys of the weights:

* ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.LayerNorm`` get a
  subclass whose forward quantizes the input (per tensor) and the weight
  (per output channel).
* Modules that apply their own 2-D parameters with ``F.linear`` (SpeechBrain
  ``RelPosMHAXL.in_proj_weight``, ``nn.MultiheadAttention``) get a subclass
  whose forward routes ``F.linear`` through quantizers while it runs. Module
  swapping alone would miss these projections.
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
    always recomputes so the QDQ nodes land in the graph.
    """

    @staticmethod
    def get(module, attr, weight, quantizer):
        if not quantizer.is_enabled:
            return weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        cache = module.__dict__.setdefault("_esc_qweight_cache", {})
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if tracing or torch.is_grad_enabled() or cache.get(attr, (None,))[0] != key:
            qweight = quantizer(weight)
            if tracing or torch.is_grad_enabled():
                return qweight
            cache[attr] = (key, qweight.detach())
        return cache[attr][1]


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


def _subclass(mixin, cls):
    """A cached ``Quant<cls>`` class combining our mixin with the original class."""
    key = (mixin, cls)
    if key not in _SUBCLASS_CACHE:
        _SUBCLASS_CACHE[key] = type("Quant" + cls.__name__, (mixin, cls), {"__module__": __name__})
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


# ---------------------------------------------------------------- functional linear

class FunctionalLinearMixin:
    """Quantize ``F.linear(x, W_view)`` calls where ``W`` is one of this module's
    own 2-D parameters (possibly a chunk of it, as in ``in_proj_weight.chunk(3)``).

    Each distinct (parameter, row range) call site gets its own input quantizer,
    created the first time the call is seen, named e.g.
    ``encoder.layers.0.self_att.in_proj_weight[0:144]``.
    """

    def esc_init_functional(self, name, weight_bits, act_bits, on_new_point):
        self.esc_name = name
        self.esc_act_bits = act_bits
        self.esc_on_new_point = on_new_point
        self.esc_weight_quantizers = nn.ModuleDict()
        self.esc_input_quantizers = nn.ModuleDict()
        self.esc_params = functional_params(self)
        for pname in self.esc_params:
            q = weight_quantizer(weight_bits)
            calibrate_weight(q, self.get_parameter(pname))
            self.esc_weight_quantizers[_safe(pname)] = q

    def esc_call_site(self, weight):
        """(parameter name, key, row slice) for a weight view, or None."""
        ptr = weight.untyped_storage().data_ptr()
        for pname in self.esc_params:
            p = self.get_parameter(pname)
            if p.untyped_storage().data_ptr() == ptr and p.is_contiguous():
                start = (weight.storage_offset() - p.storage_offset()) // p.shape[1]
                stop = start + weight.shape[0]
                whole = start == 0 and stop == p.shape[0]
                key = pname if whole else f"{pname}[{start}:{stop}]"
                return pname, key
        return None

    def esc_qweight_view(self, pname, weight):
        p = self.get_parameter(pname)
        qp = _CachedWeight.get(self, pname, p, self.esc_weight_quantizers[_safe(pname)])
        return qp.as_strided(weight.size(), weight.stride(), weight.storage_offset() - p.storage_offset())

    def esc_linear(self, x, weight, bias=None):
        site = self.esc_call_site(weight)
        if site is None:  # not ours: leave it (the coverage report will list it)
            return _ORIG_LINEAR(x, weight, bias)
        pname, key = site
        safe = _safe(key)
        if safe not in self.esc_input_quantizers:
            offset = weight.storage_offset() - self.get_parameter(pname).storage_offset()
            self.esc_add_site(pname, key, tuple(weight.size()), tuple(weight.stride()), offset)
        with _quantized_op():
            return _ORIG_LINEAR(self.esc_input_quantizers[safe](x), self.esc_qweight_view(pname, weight), bias)

    def esc_add_site(self, pname, key, size, stride, offset):
        """Create the input quantizer of one call site (at first call, or when loading)."""
        q = ActivationQuantizer(self.esc_act_bits, f"{self.esc_name}.{key}")
        self.esc_input_quantizers[_safe(key)] = q
        self.esc_sites = getattr(self, "esc_sites", []) + [(pname, key, size, stride, offset)]
        point = self._esc_point(q, pname, key, size, stride, offset)
        self.esc_on_new_point(point)
        return point

    def _esc_point(self, quantizer, pname, key, size, stride, offset):
        def output(x, quantize_weight, m=self):
            p = m.get_parameter(pname)
            src = _CachedWeight.get(m, pname, p, m.esc_weight_quantizers[_safe(pname)]) if quantize_weight else p
            return _ORIG_LINEAR(x, src.as_strided(size, stride, offset))

        return QuantPoint(f"{self.esc_name}.{key}", "linear", self, quantizer, output, size[1])

    def forward(self, *args, **kwargs):
        with _patched_linear(self), _mha_fastpath_off():
            return super().forward(*args, **kwargs)


_ACTIVE = []


@contextlib.contextmanager
def _patched_linear(module):
    """Route ``torch.nn.functional.linear`` through ``module.esc_linear``.

    Both ``F.multi_head_attention_forward`` (global name lookup) and SpeechBrain
    (``nn.functional.linear``) resolve the name at call time, so patching the
    module attribute reaches them. Nested modules stack.
    """
    _ACTIVE.append(module)
    F.linear = _dispatch_linear
    try:
        yield
    finally:
        _ACTIVE.pop()
        if not _ACTIVE:
            F.linear = _ORIG_LINEAR


def _dispatch_linear(x, weight, bias=None):
    if not _ACTIVE:
        return _ORIG_LINEAR(x, weight, bias)
    return _ACTIVE[-1].esc_linear(x, weight, bias)


@contextlib.contextmanager
def _mha_fastpath_off():
    # nn.MultiheadAttention's fused inference kernel skips F.linear entirely.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


_FUSED_TRANSFORMER_TYPES = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def keep_transformer_layers_unfused(model):
    """Turn torch's fused transformer fast path off while these layers run.

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` (and
    ``TransformerEncoder`` / ``TransformerDecoderLayer``) run one fused kernel
    that never reaches the layers' Linear / LayerNorm modules, so their
    quantizers would be silently skipped. Hooks on the quantized copy only.
    """
    saved = []

    def off(module, args):
        saved.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)

    def restore(module, args, output):
        if saved:
            torch.backends.mha.set_fastpath_enabled(saved.pop())

    for module in model.modules():
        if isinstance(module, _FUSED_TRANSFORMER_TYPES):
            module.register_forward_pre_hook(off)
            module.register_forward_hook(restore, always_call=True)


def _safe(key):
    """A ModuleDict key for a parameter name / call site."""
    return key.replace(".", "_").replace("[", "_").replace(":", "_").replace("]", "")


def functional_params(module):
    """Names of the 2-D parameters ``module`` applies with ``F.linear`` itself.

    Its own 2-D parameters, plus ``out_proj.weight`` for ``nn.MultiheadAttention``,
    whose forward passes the child's weight to ``F.multi_head_attention_forward``
    instead of calling the child.
    """
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 2]
    if isinstance(module, nn.MultiheadAttention):
        names.append("out_proj.weight")
    return names


def functional_children(module):
    """Child modules whose forward the parent bypasses (their weights are used functionally)."""
    return [module.out_proj] if isinstance(module, nn.MultiheadAttention) else []


def uses_functional_weights(module):
    """Modules that own 2-D weight parameters but are not Linear/Conv themselves."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm,
                           nn.Embedding, nn.RNNBase, nn.modules.conv._ConvTransposeNd)):
        return False
    return any(p.dim() == 2 for _, p in module.named_parameters(recurse=False))


def wrap_functional(module, name, weight_bits, act_bits, on_new_point):
    module.__class__ = _subclass(FunctionalLinearMixin, type(module))
    module.esc_init_functional(name, weight_bits, act_bits, on_new_point)
