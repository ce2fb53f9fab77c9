"""SmoothQuant: move activation outliers into the weights, per input channel.

For a Linear / Conv site with input ``X`` and weight ``W``, per input channel
``j``: ``s_j = max|X_j|^α / max|W_j|^(1-α)``; the op computes
``(X / s) (s W)``, identical in FP32, while the quantized input ``X / s`` has
its outlier channels flattened (Xiao et al., 2023). Here ``X / s`` is a
per-channel divisor kept on the site's input quantizer (``pre_scale``: a Div
in front of the QuantizeLinear in an exported graph) and ``s W`` replaces the
weight of the quantized copy, whose per-channel weight scales are then
recalibrated. Runs before calibration, so every calibrator sees the smoothed
activations.

α is one value for every site (``QuantConfig(smoothquant_alpha=0.5)``), or
``"auto"``: per site, the α of a grid that minimises the site's *output*
error with its smoothed input and weight both quantized (the criterion of
ESC's local init, Eq. 4, on the first calibration inputs). Migration helps a
site whose input has outlier channels and hurts one whose weight has them,
which a single α cannot tell apart (OpenVINO's Whisper recipe uses different
α for encoder and decoder for that reason).

Covered: ``nn.Linear`` and ungrouped ``nn.Conv1d`` / ``nn.Conv2d`` sites.
Left as they are (named in the report): LayerNorm inputs (normalisation over
the channels does not commute with a per-channel scale), grouped convolutions
and functional ``F.linear`` call sites.

Example
-------
>>> import torch, esc_plugin as esc
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> x = torch.randn(16, 8) * torch.tensor([1.0] * 7 + [50.0])   # one outlier channel
>>> cfg = esc.QuantConfig(method="max", ptq=("smoothquant",))
>>> q = esc.quantize(model, cfg, lambda m: m(x), progress=False)
>>> [p["name"] for p in q.esc_report.ptq]
['smoothquant']
"""
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..numerics import fake_quant
from ..registry import register_transform

_MIN, _MAX = 1e-5, 1e5
# candidates of smoothquant_alpha="auto" (0 = no migration)
AUTO_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
# activation clip ratios tried with each α, so α is not judged under a max scale ESC would not keep
_CLIPS = (1.0, 0.5, 0.25)


class _ChannelMax:
    """Observer: running max |x| per input channel (``axis``); with ``keep`` > 0 also the first
    inputs, up to ``keep`` elements (for the per-site α search)."""

    def __init__(self, axis, keep=0):
        self.axis, self.amax, self.keep, self.inputs = axis, None, keep, []

    def __call__(self, x):
        if self.keep > 0:
            self.inputs.append(x.detach()[:max(1, self.keep // max(1, x[:1].numel()))])
            self.keep -= self.inputs[-1].numel()
        x = x.detach().float().abs()
        dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
        m = x.amax(dim=dims) if dims else x
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)


def observe_channels(ctx, axis_of, keep):
    """One pass of the forward loop recording per-channel input maxima (and up to ``keep`` inputs)
    of every site for which ``axis_of(point)`` gives a channel axis (None: not observed)."""
    observers = {}

    def factory(point):
        axis = axis_of(point)
        observers[point.name] = _ChannelMax(axis, keep) if axis is not None else None
        return observers[point.name]

    ctx.plan.start_observing(factory)
    try:
        with torch.no_grad():
            ctx.forward_loop(ctx.model)
    finally:
        ctx.plan.stop_observing()
    return observers


def _smoothable(point):
    m = point.module
    if point.op == "linear" and isinstance(m, torch.nn.Linear):
        return True
    return point.op in ("conv1d", "conv2d") and isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and m.groups == 1


def _axis(point):
    return -1 if point.op == "linear" else 1


def _weight_channel_max(weight, op):
    w = weight.detach().float().abs()
    if op == "linear":
        return w.amax(dim=0)                       # (out, in) -> per in
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)  # (out, in, k...) -> per in


@register_transform("smoothquant", stage="before_calibration",
                    summary="migrate activation outliers into the weights (per input channel)")
class SmoothQuant:
    def __init__(self, config):
        self.auto = config.smoothquant_alpha == "auto"
        self.alpha = None if self.auto else float(config.smoothquant_alpha)
        self.bits = (config.weight_bits, config.act_bits)
        self.keep = config.init_max_elements if self.auto else 0
        self.scales, self.alphas = {}, {}

    def check(self, model):
        kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
        if not any(isinstance(m, kinds) for m in model.modules()):
            raise ConfigError(f"ptq=('smoothquant',) needs nn.Linear or nn.Conv1d/2d layers, and "
                              f"{type(model).__name__} has none: drop 'smoothquant' from ptq.")

    def apply(self, ctx):
        points = [p for p in ctx.plan.points if _smoothable(p)]
        if not points:
            raise ConfigError("ptq=('smoothquant',): no Linear / ungrouped Conv site is quantized in this "
                              "model (check QuantConfig.exclude), so there is nothing to smooth.")
        observers = observe_channels(ctx, lambda p: _axis(p) if _smoothable(p) else None, self.keep)
        for p in points:
            obs = observers.get(p.name)
            if obs is None or obs.amax is None:
                continue
            alpha = _best_alpha(p, obs, *self.bits) if self.auto else self.alpha
            self.alphas[p.name] = alpha
            if alpha == 0:
                continue
            s = _migration(p, obs.amax, alpha)
            self.scales[p.name] = s.cpu()
            _smooth(p, s)
        skipped = len(ctx.plan.points) - len(self.scales)
        how = f"alpha {self.alpha}" if not self.auto else \
            "alpha per site by output error: " + _histogram(self.alphas.values())
        ctx.report.notes.append(f"smoothquant ({how}): smoothed {len(self.scales)} sites, left {skipped} "
                                "(LayerNorm inputs, grouped convs, functional, unused or α=0 sites)")

    def state_dict(self):
        return {"alpha": "auto" if self.auto else self.alpha, "alphas": dict(self.alphas),
                "scales": dict(self.scales)}

    def load_state_dict(self, state, ctx):
        self.alpha, self.scales = state["alpha"], dict(state["scales"])
        self.auto, self.alphas = self.alpha == "auto", dict(state.get("alphas", {}))
        by_name = {p.name: p for p in ctx.plan.points}
        for name, s in self.scales.items():
            _smooth(by_name[name], s)


def _migration(point, x_max, alpha):
    w_max = _weight_channel_max(point.module.weight, point.op).clamp_min(_MIN)
    x_max = x_max.to(w_max.device)
    s = (x_max.clamp_min(_MIN) ** alpha / w_max ** (1 - alpha)).clamp(_MIN, _MAX)
    return torch.where(x_max > 0, s, torch.ones_like(s))


def _op(point, x, weight):
    """The site's float op (its input quantizer bypassed) with ``weight``."""
    m = point.module
    if point.op == "linear":
        return F.linear(x, weight, m.bias)
    conv = next(c for c in type(m).__mro__ if c in (torch.nn.Conv1d, torch.nn.Conv2d))
    return conv._conv_forward(m, x, weight, m.bias)


@torch.no_grad()
def _best_alpha(point, obs, weight_bits, act_bits):
    """The α of :data:`AUTO_ALPHAS` with the smallest output error of the quantized site."""
    w = point.module.weight.detach()
    xs = [x.to(w.dtype) for x in obs.inputs]
    refs = [_op(point, x, w).float() for x in xs]
    view = [1] * w.dim()
    view[1] = -1
    errors = {}
    for alpha in AUTO_ALPHAS:
        s = _migration(point, obs.amax, alpha) if alpha else torch.ones(w.shape[1], device=w.device)
        ws = w * s.to(w.dtype).view(view)
        w_amax = ws.abs().flatten(1).amax(1).clamp_min(_MIN).view([-1] + [1] * (w.dim() - 1))
        wq = fake_quant(ws.float(), w_amax.float(), weight_bits).to(w.dtype)
        x_view = [1] * xs[0].dim()
        x_view[_axis(point)] = -1
        smoothed = [x / s.to(x.dtype).view(x_view) for x in xs]
        x_amax = max(float(x.abs().max()) for x in smoothed)
        errors[alpha] = min(sum(float(((_op(point, fake_quant(x.float(), x_amax * c, act_bits).to(w.dtype), wq)
                                        .float() - r) ** 2).sum()) for x, r in zip(smoothed, refs))
                            for c in _CLIPS)
    return min(errors, key=lambda a: (errors[a], a))


def _histogram(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"α={a}: {n}" for a, n in sorted(counts.items()))


@torch.no_grad()
def _smooth(point, s):
    from ..quantizers import calibrate_weight  # modelopt: only when a model is quantized

    w = point.module.weight
    s = s.to(device=w.device, dtype=w.dtype)
    shape = [1] * w.dim()
    shape[1] = -1
    # A new parameter, never an in-place change: the weight may be tied to another module's
    # (Whisper's vocabulary projection is its token embedding), which must stay as it is.
    point.module.weight = torch.nn.Parameter(w.detach() * s.view(shape), requires_grad=w.requires_grad)
    point.input_quantizer.set_pre_scale(s, _axis(point))
    calibrate_weight(point.module.weight_quantizer, point.module.weight)
