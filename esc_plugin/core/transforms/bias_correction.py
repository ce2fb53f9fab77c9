"""Bias correction: fold each quantized layer's expected output shift into its bias.

Quantizing a layer's input and weight shifts the mean of its output per
channel (Nagel et al., 2019, empirical bias correction). After calibration,
one pass of the forward loop through the quantized copy measures, for every
Linear / Conv site and on the input that site actually receives, the mean of
``l_fp32(x) - l_q(x)`` per output channel, and adds it to the bias (created
as zeros where the layer had none). Each layer's own shift is measured on
the same input, so the corrections do not compound.

``QuantConfig(bias_correction_error=...)`` says which error is corrected:

- ``"weight"`` (default): the weight's share only, ``(W - W_q) · Q(x)`` on
  the input as quantized (Nagel et al.'s data-free bias correction, measured
  on data instead of BatchNorm statistics).
- ``"output"``: the whole shift, ``l_fp32(x) - l_q(x)``, from the weight
  *and* the input quantizer (AIMET's empirical bias correction). At 4-bit
  activations this includes the clipping of the input, whose mean the search
  may already have traded against its spread, so folding it moves every
  output, clipped or not (why it is not the default: see the README's
  Table 2 rows).

Covered: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` sites whose class keeps
the torch ``forward`` (subclasses that pad in their own ``forward`` are left
as they are). One calibration pass.
"""
import torch
import torch.nn as nn

from ..registry import register_transform

_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _correctable(point):
    """A Linear / Conv site whose original class keeps torch's own ``forward``."""
    m = point.module
    bases = type(m).__bases__  # the wrapper class is (mixin, original class)
    original = bases[-1] if len(bases) == 2 else type(m)
    base = next((c for c in _PLAIN if isinstance(m, c)), None)
    return base is not None and original.forward is base.forward and point.input_quantizer.is_enabled


class _Shift:
    """Running sum, per output channel of one site, of the shift it corrects: ``l_fp32(x) - l_q(x)``
    (``"output"``) or ``(W - W_q) · Q(x)`` (``"weight"``)."""

    def __init__(self, point, error):
        self.point, self.error, self.sum, self.count = point, error, None, 0

    def __call__(self, module, args, output):
        p = self.point
        # "weight": the float weight on the input as quantized, so the difference is (W - W_q) Q(x)
        x = p.input_quantizer(args[0]) if self.error == "weight" else p.input_quantizer.apply_pre_scale(args[0])
        with torch.no_grad():
            diff = (p.output(x, False) - output).float()
        axis = diff.dim() - 1 if p.op == "linear" else 1
        dims = [d for d in range(diff.dim()) if d != axis]
        s = diff.sum(dim=dims)
        self.sum = s if self.sum is None else self.sum + s
        self.count += diff.numel() // diff.shape[axis]


@register_transform("bias_correction", stage="after_calibration", order=60,
                    summary="fold each layer's expected quantization output shift into its bias")
class BiasCorrection:
    def __init__(self, config):
        self.error = config.bias_correction_error
        self.corrections = {}

    def apply(self, ctx):
        points = [p for p in ctx.plan.points if _correctable(p)]
        shifts = [_Shift(p, self.error) for p in points]
        handles = [p.module.register_forward_hook(s) for p, s in zip(points, shifts)]
        try:
            with torch.no_grad():
                ctx.forward_loop(ctx.model)
        finally:
            for h in handles:
                h.remove()
        for s in shifts:
            if s.count:
                self.corrections[s.point.name] = (s.sum / s.count).cpu()
        for p in points:
            if p.name in self.corrections:
                _add_to_bias(p.module, self.corrections[p.name])
        ctx.report.notes.append(f"bias_correction: corrected the {self.error} error of {len(self.corrections)} of "
                                f"{len(ctx.plan.points)} sites")

    def state_dict(self):
        return {"corrections": dict(self.corrections)}

    def load_state_dict(self, state, ctx):
        self.corrections = dict(state["corrections"])
        by_name = {p.name: p for p in ctx.plan.points}
        for name, c in self.corrections.items():
            _add_to_bias(by_name[name].module, c)


@torch.no_grad()
def _add_to_bias(module, correction):
    correction = correction.to(device=module.weight.device, dtype=module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(correction), requires_grad=False)
    module.bias.add_(correction)
