"""Opt-in quantization of the attention products (``QuantConfig(quantize_attention=True)``).

ESC's op set is the inputs of Conv, Linear and LayerNorm; the two
activation x activation products of attention, ``Q K^T`` and ``P V``, stay in
float. On a transformer encoder over long inputs those products are a large
share of the work, and a deployed INT8 graph that leaves them in float cannot
be much faster than FP32.

With the option on, every ``F.scaled_dot_product_attention`` call made by a
module of the quantized copy runs as the explicit product
``softmax(Q_q K_q^T * scale + mask) _q V_q`` where:

* ``Q``, ``K`` and ``V`` get per-tensor activation quantizers that are ordinary
  ESC points (max / histogram calibrators, ESC's local init -- here the MSE of
  the quantized input, as the op has no weight -- and the CMA-ES refinement);
* the softmax probabilities get a quantizer with the fixed amax 1.0: they lie
  in [0, 1], so max calibration is exact and nothing needs searching.

All calls of one module share its quantizers (like a Linear called twice),
named ``<module>.sdpa.query`` / ``.key`` / ``.value``. The exported ONNX then
has QuantizeLinear/DequantizeLinear on both inputs of both MatMuls, which ONNX
Runtime and TensorRT run as integer products.

How a call is attributed to a module: while a module of a quantized copy with
the option on runs (forward hooks count it per thread), and only then,
``F.scaled_dot_product_attention`` is replaced by a dispatcher (see
:mod:`esc_plugin.core.patching`: installed while any thread is inside such a
module, the original again when none is). In a thread inside such a module,
the dispatcher walks up the Python stack to the nearest frame whose ``self``
is an ``nn.Module`` (the attention module's ``forward``, possibly a few helper
functions up, as in Hugging Face's ``sdpa_attention_forward``); if that module
belongs to a quantized copy with the option on, the call is quantized.
Everywhere else it goes to torch unchanged (same function, same arguments), so
FP32 models, in this thread or another, are unaffected. Attention written as
explicit ``torch.matmul`` (SpeechBrain's ``RelPosMHAXL``) is not reached and
stays listed as float in the coverage report.
"""
import math
import sys
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import QuantEmbedding, QuantMixin, QuantPoint, _quantized_op
from .patching import ScopedPatch, thread_stack
from .quantizers import ActivationQuantizer

_ORIG_SDPA = F.scaled_dot_product_attention
_SITE_LOCK = threading.Lock()  # two threads meeting a module's first call make one set of quantizers
_MAX_FRAMES = 8  # how far up the stack the owning module may be
_ROLES = ("query", "key", "value")


class AttentionQuantizers(nn.Module):
    """The quantizers of one module's attention products (a child ``esc_attention``)."""

    def __init__(self, name, act_bits):
        super().__init__()
        for role in _ROLES:
            setattr(self, role, ActivationQuantizer(act_bits, f"{name}.sdpa.{role}"))
        self.probs = ActivationQuantizer(act_bits, f"{name}.sdpa.probs")
        self.probs.set_amax(1.0)  # softmax output range: exact, never searched


def mark_attention_modules(qmodel, plan):
    """Let every module of ``qmodel`` have its SDPA calls quantized (called by ``insert_quantizers``).

    Each module that may call SDPA also gets a pair of forward hooks holding
    the dispatcher while it runs (the quantized leaves and the quantizers never
    call it).
    """
    for name, module in qmodel.named_modules():
        module.__dict__["esc_attention_owner"] = (name, plan)
        if not isinstance(module, (QuantMixin, QuantEmbedding, ActivationQuantizer, AttentionQuantizers)):
            module.register_forward_pre_hook(_enter)
            module.register_forward_hook(_leave, always_call=True)


def _enter(module, args):
    thread_stack("sdpa").append(module)
    _SDPA_PATCH.acquire()


def _leave(module, args, output):
    # Also called when the forward raised; skipped when an earlier pre-hook raised before _enter.
    # (A BaseException such as KeyboardInterrupt skips always_call hooks: the dispatcher may then
    # stay installed, still transparent, since every call is attributed by the stack walk.)
    stack = thread_stack("sdpa")
    if stack and stack[-1] is module:
        stack.pop()
        _SDPA_PATCH.release()


def add_attention_site(module, name, plan):
    """Create ``module``'s attention quantizers and their plan points (first call, or when loading)."""
    quantizers = AttentionQuantizers(name, plan.config.act_bits)
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    if tensor is not None:  # the module's device (a quantizer's amax lives with its input)
        quantizers.to(tensor.device)
    for role in _ROLES:
        plan.add_point(QuantPoint(f"{name}.sdpa.{role}", "attention", module, getattr(quantizers, role),
                                  _identity, None))
    module.add_module("esc_attention", quantizers)  # last: from here on other threads use them
    return quantizers


def attention_sites(qmodel):
    """Names of the modules whose attention products are quantized (saved with the scales)."""
    return [name for name, module in qmodel.named_modules() if isinstance(
        getattr(module, "esc_attention", None), AttentionQuantizers)]


def _identity(x, quantize_weight):
    # The local init minimises ||l(x) - l_q(x)||²; with no weight, l is the identity.
    return x


def _owner(depth=2):
    frame = sys._getframe(depth)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        module = frame.f_locals.get("self")
        if module is None:
            module = frame.f_locals.get("module")
        if isinstance(module, nn.Module):
            return module.__dict__.get("esc_attention_owner") and module
        frame = frame.f_back
    return None


def _dispatch_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    out = None
    if thread_stack("sdpa"):  # this thread is inside a marked module
        out = quantized_attention_if_owned(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                           enable_gqa, _depth=3)
    if out is None:
        return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return out


_SDPA_PATCH = ScopedPatch(F, "scaled_dot_product_attention", _dispatch_sdpa)


def quantized_attention_if_owned(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, _depth=2):
    """The quantized product if the calling module quantizes its attention, else None.

    Also used by the ONNX export's ``nn.MultiheadAttention`` rewrite, so the
    exported graph quantizes the same products as the PyTorch model.
    """
    module = _owner(_depth)  # only marked (quantize_attention=True) modules are owners
    if module is None:
        return None
    name, plan = module.esc_attention_owner
    quantizers = module._modules.get("esc_attention")
    if not isinstance(quantizers, AttentionQuantizers):
        with _SITE_LOCK:
            quantizers = module._modules.get("esc_attention")
            if not isinstance(quantizers, AttentionQuantizers):
                quantizers = add_attention_site(module, name, plan)
    with _quantized_op():
        return quantized_sdpa(quantizers, query, key, value, attn_mask, dropout_p, is_causal, scale,
                              enable_gqa, quantize_probs=not plan.observing)


def quantized_sdpa(quantizers, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False, quantize_probs=True):
    """``F.scaled_dot_product_attention`` written out, with quantized matmul inputs."""
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    # Quantize K after the transpose so that Q/DQ sits right on the MatMul input in the ONNX graph.
    scores = torch.matmul(quantizers.query(query), quantizers.key(key.transpose(-2, -1))) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if is_causal or attn_mask is not None:  # rows masked entirely give 0, not NaN (as torch's SDPA does)
        probs = torch.nan_to_num(probs, nan=0.0)
    if dropout_p > 0:
        probs = torch.dropout(probs, dropout_p, True)
    if quantize_probs:
        probs = quantizers.probs(probs)
    return torch.matmul(probs, quantizers.value(value))
