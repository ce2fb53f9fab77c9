"""NoisyQuant: a fixed noisy bias added to each activation before quantizing it, removed in the bias.

For a site with input ``x``, weight ``W``, bias ``b`` and activation step
``Δ = amax / (2**(b-1) - 1)``, NoisyQuant (Liu et al., CVPR 2023) draws one
fixed vector ``n ~ U(-K/2, K/2)`` per input channel and computes
``W Q(x + n) + (b - W n)``: in FP32 this is exactly ``W x + b``; quantized, the
noise dithers the heavy-tailed activation against the quantization grid,
which lowers the layer's output error on many layers. The noise is kept on
the site's input quantizer (``ActivationQuantizer.set_noise``, applied after
any SmoothQuant pre-scale, like it a buffer, so population batching, the
observers and the state file see it) and ``-W n`` is folded into the bias of
the quantized copy (created as zeros where the layer had none).

When: ``after_calibration``, order 10. ``Δ`` comes from the *final*
activation amax, as in the paper (the noise is sampled from the calibrated
step); the calibrator therefore chose its amax without the noise, and
weight reconstruction (order 20) and bias correction (order 60) run after it
and see the noisy inputs (bias correction measures the output shift of
``x + n`` against the FP32 ``W (x + n) + b - W n``, so it does not undo the fold).

Amplitude: per site, the paper searches ``K``; here ``K / Δ`` is chosen from
:data:`AMPLITUDES` (and 0, no noise) with :data:`DRAWS` noise draws each, by
the site's quantized output error ``‖W_q Q(x + n) - W n - W x‖²`` on the first
FP32 calibration inputs of that site (``QuantConfig.init_max_elements``
elements per site, one extra FP32 pass). A site whose best is 0 keeps no noise.
With this library's symmetric grids, 0 is a quantization level, so an
activation peaked at zero (post-ReLU / post-GELU) is already held well near
its peak and a noisy bias mostly adds error there: the search then keeps
``K = 0`` at that site. The gains come at sites with smooth, wide input
distributions.

Covered: ``nn.Linear`` sites and plain ``nn.Conv1d`` / ``nn.Conv2d`` sites
whose ``W n`` is a constant per output channel, i.e. without zero padding
(``padding`` 0 / ``'valid'``, or a non-zero ``padding_mode``, which pads the
already noisy input); any ``groups``, stride and dilation. Left as they are
(named in the report): zero-padded convolutions (at the border the padded
zeros carry no noise, so ``-W n`` would be wrong there: the fold is exact only
in the interior), conv subclasses with their own ``forward``, functional
``F.linear`` sites (no bias to fold into) and LayerNorm inputs.

Export: the noise traces as an ``Add`` of a constant in front of the site's
QuantizeLinear and the fold is in the layer's bias initializer, so the QDQ
graph is the same model (``x -> Add(n) -> Q -> DQ -> MatMul/Conv -> + (b - W n)``);
the ``Add`` is not folded into the preceding op.

Example
-------
>>> import torch, esc_plugin as esc
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
>>> x = torch.randn(16, 8)
>>> cfg = esc.QuantConfig(bits=4, method="max", ptq=("noisyquant",))
>>> q = esc.quantize(model, cfg, lambda m: m(x), progress=False)
>>> [p["name"] for p in q.esc_report.ptq]
['noisyquant']
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..numerics import fake_quant
from ..registry import register_transform
from .smoothquant import _axis, _op, observe_channels

# K / Δ candidates (0 = no noise is always a candidate), each with DRAWS noise vectors
AMPLITUDES = (0.25, 0.5, 0.75, 1.0)
DRAWS = 4
_CONVS = (nn.Conv1d, nn.Conv2d)


def _original_class(module):
    bases = type(module).__bases__  # the wrapper class is (mixin, original class)
    return bases[-1] if len(bases) == 2 else type(module)


def skip_reason(point):
    """Why NoisyQuant cannot fold at ``point`` exactly (None: it can)."""
    m = point.module
    if point.op == "linear":
        return None if isinstance(m, nn.Linear) else "functional F.linear site (no bias to fold into)"
    if point.op not in ("conv1d", "conv2d") or not isinstance(m, _CONVS):
        return f"{point.op} input"
    base = next(c for c in _CONVS if isinstance(m, c))
    if _original_class(m).forward is not base.forward:
        return "conv subclass with its own forward"
    unpadded = m.padding == "valid" or (not isinstance(m.padding, str) and not any(m.padding))
    if not unpadded and m.padding_mode == "zeros":
        return "zero-padded conv (the fold would be wrong at the borders)"
    return None


def _foldable(point):
    return skip_reason(point) is None and point.input_quantizer.is_enabled and \
        point.input_quantizer.amax is not None


@torch.no_grad()
def noise_through_weight(point, noise):
    """``W n`` per output channel (the FP32 weight), for a Linear or an unpadded conv."""
    m = point.module
    w = m.weight
    n = noise.to(device=w.device, dtype=w.dtype)
    if point.op == "linear":
        return F.linear(n, w)
    # the conv of the constant input n over one (dilated) kernel window: W n with groups handled
    span = [d * (k - 1) + 1 for d, k in zip(m.dilation, m.kernel_size)]
    x = n.view([1, -1] + [1] * len(span)).expand([1, n.numel()] + span)
    conv = F.conv1d if point.op == "conv1d" else F.conv2d
    return conv(x, w, None, 1, 0, m.dilation, m.groups).reshape(-1)


def _channel_view(point, t, dim):
    shape = [1] * dim
    shape[_axis(point)] = -1
    return t.view(shape)


@torch.no_grad()
def _best_noise(point, inputs, bits, generator):
    """(K / Δ, noise) with the smallest quantized output error over ``inputs`` (K = 0: no noise)."""
    q = point.input_quantizer
    amax = float(q.amax)
    step = amax / (2 ** (bits - 1) - 1)
    w = point.module.weight
    wq = point.module.esc_weight(True)
    xs = [x.to(w.dtype) for x in inputs]
    refs = [_op(point, x, w).float() for x in xs]
    channels = xs[0].shape[_axis(point)]

    def error(noise):
        fold = _channel_view(point, noise_through_weight(point, noise).float(), refs[0].dim()) \
            if noise is not None else 0.0
        total = 0.0
        for x, r in zip(xs, refs):
            noisy = x if noise is None else x + _channel_view(point, noise.to(x.dtype), x.dim())
            y = _op(point, fake_quant(noisy.float(), torch.tensor(amax), bits).to(w.dtype), wq).float()
            total += float(((y - fold - r) ** 2).sum())
        return total

    best = (error(None), 0.0, None)
    for k in AMPLITUDES:
        for _ in range(DRAWS):
            u = torch.rand(channels, generator=generator) - 0.5
            noise = (u * k * step).to(w.device)
            e = error(noise)
            if e < best[0]:
                best = (e, k, noise)
    return best[1], best[2]


@register_transform("noisyquant", stage="after_calibration", order=10,
                    summary="fixed per-channel noise before each activation quantizer, removed in the bias")
class NoisyQuant:
    def __init__(self, config):
        self.bits, self.seed, self.keep = config.act_bits, config.seed, config.init_max_elements
        self.noise, self.amplitudes = {}, {}

    def check(self, model):
        if not any(isinstance(m, (nn.Linear,) + _CONVS) for m in model.modules()):
            raise ConfigError(f"ptq=('noisyquant',) needs nn.Linear or nn.Conv1d/2d layers (the noise is "
                              f"removed through their bias), and {type(model).__name__} has none: drop "
                              "'noisyquant' from ptq.")

    def apply(self, ctx):
        from tqdm.auto import tqdm

        points = [p for p in ctx.plan.points if _foldable(p)]
        if not points:
            reasons = sorted({skip_reason(p) or "left in float" for p in ctx.plan.points})
            raise ConfigError("ptq=('noisyquant',): no quantized nn.Linear or unpadded nn.Conv1d/2d site to "
                              f"fold the noise into (this model's sites: {', '.join(reasons) or 'none'}); "
                              "drop 'noisyquant' from ptq.")
        names = {p.name for p in points}
        observers = observe_channels(ctx, lambda p: _axis(p) if p.name in names else None, self.keep)
        generator = torch.Generator().manual_seed(int(self.seed))
        for p in tqdm(points, desc="noisyquant", disable=not ctx.progress, leave=False):
            obs = observers.get(p.name)
            if obs is None or not obs.inputs:
                continue
            k, noise = _best_noise(p, obs.inputs, self.bits, generator)
            self.amplitudes[p.name] = k
            if noise is not None:
                self.noise[p.name] = noise.cpu()
                _add_noise(p, noise)
        skipped = {}
        for p in ctx.plan.points:
            if p.name not in names:
                reason = skip_reason(p) or "left in float"
                skipped[reason] = skipped.get(reason, 0) + 1
        left = "; ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
        ctx.report.notes.append(
            f"noisyquant: noise on {len(self.noise)} of {len(points)} foldable sites (K/Δ chosen by output "
            f"error: {_histogram(self.amplitudes.values())})" + (f"; left: {left}" if left else ""))

    def state_dict(self):
        return {"noise": dict(self.noise),
                "amplitudes": {k: torch.tensor(v) for k, v in self.amplitudes.items()}}

    def load_state_dict(self, state, ctx):
        self.noise = dict(state["noise"])
        self.amplitudes = {k: float(v) for k, v in state.get("amplitudes", {}).items()}
        by_name = {p.name: p for p in ctx.plan.points}
        for name, noise in self.noise.items():
            _add_noise(by_name[name], noise)


def _histogram(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "none"


@torch.no_grad()
def _add_noise(point, noise):
    m = point.module
    fold = noise_through_weight(point, noise)
    bias = m.bias.detach() if m.bias is not None else torch.zeros_like(fold)
    # a new parameter, never in place: a bias may be shared with another module
    m.bias = nn.Parameter(bias - fold, requires_grad=False)
    point.input_quantizer.set_noise(noise.to(m.weight.device), _axis(point))
