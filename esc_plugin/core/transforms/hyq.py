"""HyQ-style quantization-aware distribution scaling (QADS) of convolution inputs.

HyQ (Kim, Lee & Kim, IJCAI 2024, "Hardware-Friendly Post-Training
Quantization for CNN-Transformer Hybrid Networks") has two parts:

1. **QADS** (implemented here): the convolutions of the CNN part have large
   inter-channel variance in their inputs, so one per-tensor activation scale
   wastes most levels on a few channels. Per input channel ``j`` a factor
   ``α_j`` rescales ``x_j / α_j`` and ``W[:, j] · α_j`` (identical in FP32),
   and ``α`` is *optimised* (Adam, on the calibration inputs) to minimise the
   MSE between the layer's FP32 output and its output with the scaled input
   and weight both quantized; the factors are then merged into the quantizer.
2. **Linear softmax** (not implemented): an integer-only softmax whose
   exponential is a linear function of the INT32 input, to save FPGA lookup
   tables and flip-flops. Here softmax and the activation x activation
   matmuls of attention stay in float in the simulation and in the exported
   graphs (only Linear / Conv / LayerNorm inputs are quantized), and an
   approximate softmax would change the FP32 function itself; its gain is in
   hardware resources, which this library does not build.

Also not implemented: the FQ-ViT parts HyQ's code runs with (power-of-two
factor integer LayerNorm and log2 integer softmax: per-channel and
non-uniform activation quantizers, outside this library's symmetric
per-tensor activation framework) and its asymmetric (zero point) activation
quantizer (ours are symmetric). BatchNorm folding, which HyQ does first, is
the task's job (honk's loader folds its scales).

What reduces to something already here: the reparametrisation is exactly
SmoothQuant's (``smoothquant.py``: a per-channel ``pre_scale`` on the input
quantizer, a Div in front of the QuantizeLinear in an exported graph, and
``W · α`` as the weight of the quantized copy, whose per-channel weight
scales are recalibrated). What is different, and what this pass adds: ``α``
is one free value per channel learned on the quantized output error, not the
closed form ``max|X|^a / max|W|^(1-a)`` with one exponent per site. The
quantizers in the loss are the ones of this library (per-tensor symmetric
activation with the max of the scaled input, per-output-channel weight), with
straight-through rounding and the gradient through the step as in LSQ, so the
scale's dependence on ``α`` is learned too (HyQ's code rounds without a
straight-through estimator and gets its gradient from the step only).

Runs before calibration (the calibrator sees the scaled activations), order
55, after ``smoothquant``: a site SmoothQuant already scaled is left as it is.
Covered: ungrouped ``nn.Conv1d`` / ``nn.Conv2d`` sites (the CNN part of a
CNN -> transformer model: ECAPA-TDNN's convolutions, a conformer's pointwise
convolutions, a front-end's subsampling convolutions). Left as they are
(named in the report): Linear inputs (use ``smoothquant`` for them), grouped
and depthwise convolutions. The loss is evaluated exactly at every step and
the best ``α`` seen is kept, starting from ``α = 1``, so a site is never
scaled to a larger error on its calibration inputs than without QADS.

Example
-------
>>> import torch, esc_plugin as esc
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3), torch.nn.ReLU(), torch.nn.Conv1d(8, 2, 1))
>>> x = torch.randn(8, 4, 20) * torch.tensor([1.0, 1.0, 1.0, 30.0]).view(1, 4, 1)
>>> q = esc.quantize(model, esc.QuantConfig(method="max", ptq=("hyq",)), lambda m: m(x), progress=False)
>>> [p["name"] for p in q.esc_report.ptq]
['hyq']
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import register_transform
from .smoothquant import _smooth, observe_channels

STEPS = 60      # Adam steps per site (HyQ: 1000; bounded for CPU calibration, the best α seen is kept)
LR = 0.05       # on log α, so a relative step
_LOG_LIMIT = math.log(100.0)  # α within [1/100, 100]
_CONVS = (nn.Conv1d, nn.Conv2d)


def _eligible(point):
    m = point.module
    return point.op in ("conv1d", "conv2d") and isinstance(m, _CONVS) and m.groups == 1


def _ste_quant(x, amax, bits):
    """Fake quantization with straight-through rounding and the LSQ gradient through ``amax``."""
    qmax = 2 ** (bits - 1) - 1
    scale = amax / qmax
    q = torch.clamp(x / scale, -qmax, qmax)
    return (q + (q.round() - q).detach()) * scale


def _channel_amax(w):
    return w.abs().flatten(1).amax(1).clamp_min(1e-8).view([-1] + [1] * (w.dim() - 1))


def learn_scales(point, inputs, weight_bits, act_bits, steps=STEPS):
    """Per input channel ``α`` minimising the quantized output MSE; returns (α, loss at α=1, best loss)."""
    w = point.module.weight.detach().float()
    xs = [x.detach().float() for x in inputs]
    if len({x.shape[1:] for x in xs}) == 1:
        xs = [torch.cat(xs)]  # one conv per step instead of one per cached batch
    bias = None if point.module.bias is None else point.module.bias.detach().float()
    conv = F.conv1d if point.op == "conv1d" else F.conv2d
    with torch.no_grad():
        refs = [_conv(point, conv, x, w, bias) for x in xs]
    log_alpha = torch.zeros(w.shape[1], requires_grad=True)
    m1, m2 = torch.zeros_like(log_alpha), torch.zeros_like(log_alpha)  # Adam's moments (betas 0.9, 0.999)
    wview, xview = [1, -1] + [1] * (w.dim() - 2), [1, -1] + [1] * (xs[0].dim() - 2)
    best, first = None, None
    with torch.enable_grad():
        for step in range(1, steps + 2):
            alpha = log_alpha.clamp(-_LOG_LIMIT, _LOG_LIMIT).exp()
            ws = w * alpha.view(wview)
            wq = _ste_quant(ws, _channel_amax(ws).detach(), weight_bits)  # weights: per-channel max
            scaled = [x / alpha.view(xview) for x in xs]
            amax = torch.stack([s.abs().amax() for s in scaled]).amax().clamp_min(1e-8)
            loss = sum(F.mse_loss(_conv(point, conv, _ste_quant(s, amax, act_bits), wq, bias), r, reduction="sum")
                       for s, r in zip(scaled, refs))
            value = float(loss.detach())
            if first is None:
                first = value
            if best is None or value < best[0]:
                best = (value, alpha.detach().clone())
            if step > steps:
                break
            grad, = torch.autograd.grad(loss, log_alpha)
            with torch.no_grad():
                m1.mul_(0.9).add_(grad, alpha=0.1)
                m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
                log_alpha -= LR * (m1 / (1 - 0.9 ** step)) / ((m2 / (1 - 0.999 ** step)).sqrt() + 1e-8)
    return best[1], first, best[0]


def _conv(point, conv, x, weight, bias):
    m = point.module
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        return conv(x, weight, bias, m.stride, 0, m.dilation, m.groups)
    return conv(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


@register_transform("hyq", stage="before_calibration", order=55,
                    summary="HyQ's QADS: per-channel conv input scales learned on the quantized output MSE")
class HyQ:
    def __init__(self, config):
        if "smoothquant" in config.ptq and config.smoothquant_alpha != "auto":
            # SmoothQuant with one α scales every conv site first, which would leave nothing to this pass
            raise ConfigError(f"ptq={tuple(config.ptq)}: smoothquant with smoothquant_alpha="
                              f"{config.smoothquant_alpha!r} scales every conv input before hyq could: use "
                              "smoothquant_alpha='auto' (hyq then scales the sites it leaves, α=0) or only one "
                              "of the two.")
        self.bits = (config.weight_bits, config.act_bits)
        self.keep = config.init_max_elements
        self.scales, self.losses = {}, {}

    def check(self, model):
        if not any(isinstance(m, _CONVS) and m.groups == 1 for m in model.modules()):
            raise ConfigError(f"ptq=('hyq',) needs ungrouped nn.Conv1d / nn.Conv2d layers (HyQ's distribution "
                              f"scaling acts on convolution inputs), and {type(model).__name__} has none: drop "
                              "'hyq' from ptq (use 'smoothquant' for Linear inputs).")

    def apply(self, ctx):
        from tqdm.auto import tqdm

        convs = [p for p in ctx.plan.points if _eligible(p)]
        points = [p for p in convs if p.input_quantizer.pre_scale is None]
        if not points:
            why = "all already scaled by smoothquant (drop one of the two)" if convs else \
                "none is quantized (check QuantConfig.exclude)"
            raise ConfigError(f"ptq=('hyq',): no ungrouped Conv1d / Conv2d site to scale: {why}.")
        names = {p.name for p in points}
        observers = observe_channels(ctx, lambda p: 1 if p.name in names else None, self.keep)
        for p in tqdm(points, desc="hyq (QADS)", disable=not ctx.progress, leave=False):
            obs = observers.get(p.name)
            if obs is None or not obs.inputs:
                continue
            alpha, before, after = learn_scales(p, obs.inputs, *self.bits)
            self.losses[p.name] = (before, after)
            if after < before:
                self.scales[p.name] = alpha.cpu()
                _smooth(p, alpha)
        gains = [1 - a / b for b, a in self.losses.values() if b > 0]
        mean = f", mean output MSE change -{100 * sum(gains) / len(gains):.0f}%" if gains else ""
        ctx.report.notes.append(
            f"hyq (QADS, {STEPS} Adam steps per site): scaled {len(self.scales)} of {len(points)} ungrouped "
            f"conv sites{mean}; left {len(ctx.plan.points) - len(points)} sites (Linear / LayerNorm inputs, "
            f"grouped convs{', smoothquant-scaled convs' if len(convs) > len(points) else ''})")

    def state_dict(self):
        return {"scales": dict(self.scales),
                "losses": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.losses.items()}}

    def load_state_dict(self, state, ctx):
        self.scales = dict(state["scales"])
        self.losses = {k: tuple(float(x) for x in v) for k, v in state.get("losses", {}).items()}
        by_name = {p.name: p for p in ctx.plan.points}
        for name, alpha in self.scales.items():
            _smooth(by_name[name], alpha)
