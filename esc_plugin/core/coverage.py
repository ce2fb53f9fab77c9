"""Coverage report: every quantizable op, quantized or left in float with a reason.

Two views are merged:

* a module scan (types such as LSTM or Embedding are listed even if they never
  call a matmul we could see), and
* an op trace of one calibration pass at the ATen level (``TorchDispatchMode``),
  which also sees ``F.linear`` / ``torch.matmul`` calls on raw parameters that
  module swapping would miss. An op counts as quantized when it runs inside
  one of our quantized wrappers.
"""
import contextlib
from collections import OrderedDict

import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .modules import QuantEmbedding, in_quantized_op, own_forward_skipped

_TRACED = {
    "mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
    "convolution": "conv", "native_layer_norm": "layer_norm",
    "_native_multi_head_attention": "fused_attention",
    "_scaled_dot_product_flash_attention_for_cpu": "fused_attention",
    "_scaled_dot_product_attention_math": "fused_attention",
    "_scaled_dot_product_efficient_attention": "fused_attention",
    "_scaled_dot_product_flash_attention": "fused_attention",
}

_FLOAT_REASONS = {
    "matmul": "activation x activation product or a matmul on a tensor that is no module "
              "weight (e.g. attention scores / context): outside ESC's op set "
              "(inputs of Conv, Linear, LayerNorm)",
    "conv": "convolution not done by nn.Conv1d/nn.Conv2d (transposed, 3-D or functional): left in float",
    "layer_norm": "functional layer_norm outside an nn.LayerNorm: left in float",
    "fused_attention": "fused attention kernel softmax(QK^T)V: activation x activation product, "
                       "outside ESC's op set (inputs of Conv, Linear, LayerNorm); left in float",
}

_MODULE_REASONS = (
    (nn.RNNBase, "recurrent layer (LSTM/GRU): not in ESC's op set, left in float"),
    (nn.Embedding, "table lookup: no arithmetic to quantize"),
    (nn.modules.conv._ConvTransposeNd, "transposed convolution: not quantized in this version"),
    (nn.Conv3d, "3-D convolution: not quantized in this version"),
    (nn.modules.batchnorm._BatchNorm, "BatchNorm: folded into the neighbouring conv at deployment; "
                                      "not in ESC's op set"),
    (nn.GroupNorm, "GroupNorm: not in ESC's op set"),
    (nn.modules.instancenorm._InstanceNorm, "InstanceNorm: not in ESC's op set"),
)


class _OpTrace(TorchDispatchMode):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.seen = OrderedDict()  # (module, kind, quantized) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _TRACED.get(func.overloadpacket.__name__)
        if kind is not None:
            key = (self.stack[-1] if self.stack else "", kind, in_quantized_op())
            self.seen[key] = self.seen.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def trace_ops(model):
    """Context that records the ops run under it; yields the tracer."""
    stack, handles = [], []

    def leave(module, args, output):
        stack.pop()  # returns None: a forward hook's return value would replace the output

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n) or None))
        handles.append(module.register_forward_hook(leave))
    tracer = _OpTrace(stack)
    try:
        with tracer:
            yield tracer
    finally:
        for h in handles:
            h.remove()


def build_coverage(model, points, tracer, excluded):
    """List of dicts: name, op, quantized (bool), reason, calls."""
    rows = [{"name": p.name, "op": p.op, "quantized": True, "reason": "", "calls": None} for p in points]
    for name in excluded:
        rows.append({"name": name, "op": "module", "quantized": False,
                     "reason": "excluded by QuantConfig.exclude", "calls": None})
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            rows.append({"name": name, "op": "embedding", "quantized": True, "calls": None,
                         "reason": "weight only (per-row table; a lookup has no activation to quantize)"})
            continue
        if own_forward_skipped(module) and name not in excluded:
            rows.append({"name": name, "op": type(module).__name__, "quantized": False, "calls": None,
                         "reason": "subclass of Linear/LayerNorm with its own forward (a wrapper would "
                                   "skip it): left in float"})
            continue
        for cls, reason in _MODULE_REASONS:
            if isinstance(module, cls):
                rows.append({"name": name, "op": type(module).__name__, "quantized": False,
                             "reason": reason, "calls": None})
                break
    if tracer is not None:
        quantized_modules = {p.module for p in points}
        lookup = dict(model.named_modules())
        for (mod_name, kind, quantized), count in tracer.seen.items():
            if quantized:
                continue
            module = lookup.get(mod_name)
            if any(isinstance(module, cls) for cls, _ in _MODULE_REASONS) or mod_name in excluded \
                    or own_forward_skipped(module):
                continue  # already listed by the module scan
            reason = _FLOAT_REASONS[kind]
            if module in quantized_modules and kind == "matmul":
                reason = _FLOAT_REASONS["matmul"]
            rows.append({"name": mod_name or "<root>", "op": kind, "quantized": False,
                         "reason": reason, "calls": count})
    return rows
