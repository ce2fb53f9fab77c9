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

from ..errors import ConfigError
from ..registry import register_transform

_MIN, _MAX = 1e-5, 1e5


class _ChannelMax:
    """Observer: running max |x| per input channel (``axis``)."""

    def __init__(self, axis):
        self.axis, self.amax = axis, None

    def __call__(self, x):
        x = x.detach().float().abs()
        dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
        m = x.amax(dim=dims) if dims else x
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)


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
        self.alpha = float(config.smoothquant_alpha)
        self.scales = {}

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
        observers = {}

        def factory(point):
            observers[point.name] = _ChannelMax(_axis(point)) if _smoothable(point) else None
            return observers[point.name]

        ctx.plan.start_observing(factory)
        try:
            with torch.no_grad():
                ctx.forward_loop(ctx.model)
        finally:
            ctx.plan.stop_observing()
        for p in points:
            obs = observers.get(p.name)
            if obs is None or obs.amax is None:
                continue
            w_max = _weight_channel_max(p.module.weight, p.op).clamp_min(_MIN)
            x_max = obs.amax.to(w_max.device)
            s = (x_max.clamp_min(_MIN) ** self.alpha / w_max ** (1 - self.alpha)).clamp(_MIN, _MAX)
            s = torch.where(x_max > 0, s, torch.ones_like(s))
            self.scales[p.name] = s.cpu()
            _smooth(p, s)
        skipped = len(ctx.plan.points) - len(self.scales)
        ctx.report.notes.append(f"smoothquant (alpha {self.alpha}): smoothed {len(self.scales)} sites, "
                                f"left {skipped} (LayerNorm inputs, grouped convs, functional or unused sites)")

    def state_dict(self):
        return {"alpha": self.alpha, "scales": dict(self.scales)}

    def load_state_dict(self, state, ctx):
        self.alpha, self.scales = state["alpha"], dict(state["scales"])
        by_name = {p.name: p for p in ctx.plan.points}
        for name, s in self.scales.items():
            _smooth(by_name[name], s)


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
