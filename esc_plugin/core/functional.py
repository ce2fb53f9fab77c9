"""Quantize ``F.linear`` calls that modules make on their own raw parameters.

SpeechBrain's ``RelPosMHAXL`` (``in_proj_weight``) and ``nn.MultiheadAttention``
(``in_proj_weight``, ``out_proj.weight``) apply 2-D parameters with
``F.linear`` instead of calling a Linear module, so module swapping alone would
miss these projections. Such a module gets a subclass whose ``forward`` routes
``F.linear`` through its quantizers while it runs, in the thread that runs it
(see :mod:`esc_plugin.core.patching`: other threads, and this one outside the
module, get torch's ``F.linear`` unchanged).

Each call site (a parameter, or a block of its rows such as one
``in_proj_weight.chunk(3)``) gets an input quantizer the first time it runs;
a parameter gets its per-channel weight quantizer with its first call site, so
2-D parameters that never reach ``F.linear`` (``RelPosMHAXL.pos_bias_u``) stay
exactly float. ``esc_sites`` lists the sites; ``esc.load`` re-creates them
with :meth:`FunctionalLinearMixin.esc_add_site`.
"""
import contextlib
import threading

import torch.nn as nn
import torch.nn.functional as F

from .modules import _ORIG_LINEAR, QuantPoint, _CachedWeight, _quantized_op, _subclass
from .patching import ScopedPatch, mha_fastpath_off, thread_stack
from .quantizers import ActivationQuantizer, calibrate_weight, weight_quantizer

# Serialises the creation of call sites (rare: first calls and loading), so two threads meeting
# a new site at once make one quantizer. Module level: a lock on the module would not deep-copy.
_SITE_LOCK = threading.RLock()


class FunctionalLinearMixin:
    """Quantize ``F.linear(x, W_view)`` calls where ``W`` is one of this module's
    own 2-D parameters (possibly a block of rows of it, as in ``in_proj_weight.chunk(3)``).

    Call sites are named e.g. ``encoder.layers.0.self_att.in_proj_weight[0:144]``.
    """

    def esc_init_functional(self, name, weight_bits, act_bits, on_new_point):
        self.esc_name = name
        self.esc_weight_bits = weight_bits
        self.esc_act_bits = act_bits
        self.esc_on_new_point = on_new_point
        self.esc_weight_quantizers = nn.ModuleDict()  # filled per parameter at its first call site
        self.esc_input_quantizers = nn.ModuleDict()
        self.esc_params = functional_params(self)

    def esc_call_site(self, weight):
        """(parameter name, site key) for a weight view, or None if it is no view of ours."""
        ptr = weight.untyped_storage().data_ptr()
        for pname in self.esc_params:
            p = self.get_parameter(pname)
            if p.untyped_storage().data_ptr() == ptr and p.is_contiguous():
                start = (weight.storage_offset() - p.storage_offset()) // p.shape[1]
                stop = start + weight.shape[0]
                whole = start == 0 and stop == p.shape[0]
                return pname, (pname if whole else f"{pname}[{start}:{stop}]")
        return None

    def esc_qweight_view(self, pname, weight):
        p = self.get_parameter(pname)
        qp = _CachedWeight.get(self, pname, p, self.esc_weight_quantizers[_safe(pname)])
        return qp.as_strided(weight.size(), weight.stride(), weight.storage_offset() - p.storage_offset())

    def esc_linear(self, input, weight, bias=None):
        site = self.esc_call_site(weight)
        if site is None:  # not ours: leave it (the coverage report will list it)
            return _ORIG_LINEAR(input, weight, bias)
        pname, key = site
        safe = _safe(key)
        quantizer = self.esc_input_quantizers._modules.get(safe)
        if quantizer is None:
            with _SITE_LOCK:
                quantizer = self.esc_input_quantizers._modules.get(safe)
                if quantizer is None:
                    offset = weight.storage_offset() - self.get_parameter(pname).storage_offset()
                    self.esc_add_site(pname, key, tuple(weight.size()), tuple(weight.stride()), offset)
                    quantizer = self.esc_input_quantizers[safe]
        with _quantized_op():
            return _ORIG_LINEAR(quantizer(input), self.esc_qweight_view(pname, weight), bias)

    def esc_add_site(self, pname, key, size, stride, offset):
        """Create the quantizers of one call site (at its first call, or when loading); returns its point."""
        with _SITE_LOCK:
            wkey = _safe(pname)
            wq = None
            if wkey not in self.esc_weight_quantizers:
                wq = weight_quantizer(self.esc_weight_bits)
                calibrate_weight(wq, self.get_parameter(pname))
            q = ActivationQuantizer(self.esc_act_bits, f"{self.esc_name}.{key}")
            if isinstance(self, nn.MultiheadAttention):  # F.multi_head_attention_forward works time-major
                q.candidate_layout = "time_major"
            point = self._esc_point(q, pname, key, size, stride, offset)
            self.esc_on_new_point(point)  # the plan turns q off while it observes the FP32 model...
            if wq is not None:
                if not q.is_enabled:  # ...so a weight first met then must stay FP32 as well
                    wq.disable()
                self.esc_weight_quantizers[wkey] = wq
            self.esc_sites = getattr(self, "esc_sites", []) + [(pname, key, size, stride, offset)]
            self.esc_input_quantizers[_safe(key)] = q  # last: from here on other threads use the site
        return point

    def _esc_point(self, quantizer, pname, key, size, stride, offset):
        def output(x, quantize_weight, m=self):
            p = m.get_parameter(pname)
            src = _CachedWeight.get(m, pname, p, m.esc_weight_quantizers[_safe(pname)]) if quantize_weight else p
            return _ORIG_LINEAR(x, src.as_strided(size, stride, offset))

        return QuantPoint(f"{self.esc_name}.{key}", "linear", self, quantizer, output, size[1])

    def forward(self, *args, **kwargs):
        # The fast path off too: nn.MultiheadAttention's fused kernel skips F.linear entirely.
        with _patched_linear(self), mha_fastpath_off():
            return super().forward(*args, **kwargs)


def _dispatch_linear(input, weight, bias=None):
    """``F.linear`` while installed: the innermost functional module of *this* thread, else torch's."""
    stack = thread_stack("linear")
    if not stack:
        return _ORIG_LINEAR(input, weight, bias)
    return stack[-1].esc_linear(input, weight, bias)


# F.multi_head_attention_forward (global name lookup in torch.nn.functional) and SpeechBrain
# (nn.functional.linear) resolve the name at call time, so the module attribute reaches them.
_LINEAR_PATCH = ScopedPatch(F, "linear", _dispatch_linear)


@contextlib.contextmanager
def _patched_linear(module):
    """Route this thread's ``F.linear`` calls through ``module.esc_linear`` (nested modules stack)."""
    stack = thread_stack("linear")
    stack.append(module)
    _LINEAR_PATCH.acquire()
    try:
        yield
    finally:
        stack.pop()
        _LINEAR_PATCH.release()


class UnfusedTransformerMixin:
    """A torch transformer layer / encoder that always runs its unfused path."""

    def forward(self, *args, **kwargs):
        with mha_fastpath_off():
            return super().forward(*args, **kwargs)


_FUSED_TRANSFORMER_TYPES = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def keep_transformer_layers_unfused(model):
    """Turn torch's fused transformer fast path off while these layers run (in their thread).

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` (and
    ``TransformerEncoder`` / ``TransformerDecoderLayer``) run one fused kernel
    that never reaches the layers' Linear / LayerNorm modules, so their
    quantizers would be silently skipped. The layers of ``model`` (the
    quantized copy) get a subclass whose forward holds :func:`mha_fastpath_off`.
    """
    for module in model.modules():
        if isinstance(module, _FUSED_TRANSFORMER_TYPES) and not isinstance(module, UnfusedTransformerMixin):
            module.__class__ = _subclass(UnfusedTransformerMixin, type(module), prefix="Unfused")


def _safe(key):
    """A ModuleDict key for a parameter name / call site."""
    return key.replace(".", "_").replace("[", "_").replace(":", "_").replace("]", "")


def functional_params(module):
    """Names of the 2-D parameters ``module`` may apply with ``F.linear`` itself (candidates).

    Its own 2-D parameters, plus ``out_proj.weight`` for ``nn.MultiheadAttention``,
    whose forward passes the child's weight to ``F.multi_head_attention_forward``
    instead of calling the child. Only those actually passed to ``F.linear`` get
    quantizers (at their first call).

    Example
    -------
    >>> import torch
    >>> functional_params(torch.nn.MultiheadAttention(8, 2))
    ['in_proj_weight', 'out_proj.weight']
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
