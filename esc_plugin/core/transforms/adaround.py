"""AdaRound: learn each weight's rounding (up or down) layer by layer.

After calibration (activation quantizers at their final amax), every
quantized ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layer, in execution
order, learns per weight whether it rounds up or down so that its output on
its *quantized* input (what it receives in the quantized model, earlier
layers already rounded) matches the FP32 layer's output on the FP32 input
(Nagel et al., 2020: rectified-sigmoid rounding, the ``1 − |2h−1|^β``
regulariser, β annealed). The per-channel weight scales stay as calibrated:
only the integers change, so the model exports as the same QDQ graph.
Functional ``F.linear`` weights (attention in-projections) and LayerNorm
sites keep nearest rounding. The bounded defaults (iterations, recorded
rows) are in :class:`esc_plugin.core.transforms._rounding.Settings`.

The copy's weight *is* the rounded weight afterwards, so later passes that
compare against "the float layer" (``bias_correction``'s reference, a
``fallback`` site left in float) see the rounded weights, not the FP32 ones.

Example
-------
>>> import torch, esc_plugin as esc
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> x = torch.randn(64, 8)
>>> q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("adaround",)), lambda m: m(x),
...                  progress=False)
>>> [p["name"] for p in q.esc_report.ptq]
['adaround']
"""
import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigError
from ..registry import register_transform
from . import _rounding as R


def rows_of(point):
    return point.module.in_features if point.op == "linear" else None


def fp32_observers(tracker, points, order):
    """Observer factory recording each site's first FP32 inputs and the order the sites first run in."""
    recorders = {p.name: R.Recorder(tracker, rows_of(p)) for p in points}

    def factory(point):
        rec = recorders.get(point.name)
        if rec is None:
            return None

        def observe(x, rec=rec, name=point.name):
            if not rec.parts:
                order.append(name)
            rec.add(x)
        return observe

    return recorders, factory


def record_fp32(ctx, points):
    """One FP32 pass: each site's first inputs, and the order the sites first run in."""
    tracker, order = R.Tracker(), []
    recorders, factory = fp32_observers(tracker, points, order)
    R.run_pass(ctx, tracker, observe_fp32=True, factory=factory)
    return recorders, order


def _record_quantized(ctx, point):
    tracker = R.Tracker()
    rec = R.Recorder(tracker, rows_of(point))
    handle = point.input_quantizer.register_forward_hook(lambda mod, args, out: rec.add(out))
    try:
        R.run_pass(ctx, tracker)
    finally:
        handle.remove()
    return rec.parts


def _paired(point, fp32_parts, quant_parts):
    """``(inputs, targets)`` lists of batches; Linear rows pooled into one tensor."""
    if point.op == "linear":
        xf, xq = torch.cat(fp32_parts) if fp32_parts else None, torch.cat(quant_parts) if quant_parts else None
        if xf is None or xq is None:
            return [], []
        n = min(len(xf), len(xq))
        fp32_parts, quant_parts = [xf[:n]], [xq[:n]]
    # clones: a forward loop run under torch.inference_mode records tensors autograd cannot save
    pairs = [(q.clone(), f.clone()) for q, f in zip(quant_parts, fp32_parts) if q.shape == f.shape]
    weight = point.module.weight.detach()
    with torch.no_grad():
        return [q for q, _ in pairs], [R.layer_op(point, f, weight) for _, f in pairs]


def reconstruct_layer(ctx, point, fp32_parts, result, generator):
    """Learn one layer's rounding on its recorded inputs; returns False when it never ran."""
    inputs, targets = _paired(point, fp32_parts, _record_quantized(ctx, point))
    if not inputs:
        return False
    axis = -1 if point.op == "linear" else 1
    rounding = R.Rounding(point, ctx.config.weight_bits)
    step = R.Settings.batch_rows

    def batch(i):
        x, t = inputs[i], targets[i]
        k = min(len(x), step if point.op == "linear" else max(1, step // 32))
        idx = torch.randperm(len(x), generator=generator)[:k].to(x.device)
        return x[idx], t[idx]

    def loss_of(i, weights):
        x, t = batch(i)
        return R.row_loss(R.layer_op(point, x, weights[0]), t, axis)

    @torch.no_grad()
    def full_loss(codes):
        w = rounding.weight(codes)
        total = sum(R.row_loss(R.layer_op(point, x, w), t, axis) * len(x) for x, t in zip(inputs, targets))
        return float(total) / sum(len(x) for x in inputs)

    with R.one_thread():
        nearest = full_loss(rounding.nearest)
        R.optimise([rounding], loss_of, len(inputs), R.Settings, generator)
        learned = full_loss(rounding.hard_codes())
    R.finish(result, [rounding], (nearest, learned))
    return True


def check_has_layers(model, config, name):
    """A ConfigError before any work when no layer of ``model`` would have a weight to round."""
    if not R.candidate_layers(model, config.exclude):
        ops = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.LayerNorm)})
        raise ConfigError(
            f"ptq=({name!r},) learns the rounding of the weights of quantized nn.Linear / nn.Conv1d / "
            f"nn.Conv2d layers, and {type(model).__name__} has none"
            + (f" (its quantizable ops are {', '.join(ops)}, which have no weight to round)" if ops else "")
            + (f" outside QuantConfig.exclude={config.exclude}" if config.exclude else "")
            + f": drop {name!r} from ptq.")


def reconstructable_points(ctx, name):
    points = [p for p in ctx.plan.points if R.reconstructable(p)]
    if not points:
        raise CalibrationError(f"ptq=({name!r},): no quantized Linear / Conv layer with a calibrated weight "
                               "quantizer was executed by forward_loop, so there is no weight to round.")
    return points


def skipped_sites(ctx, points):
    n = len(ctx.plan.points) - len(points)
    return f"{n} site(s) (LayerNorm, functional F.linear, unused)" if n else "none"


class RoundingPass:
    """What AdaRound and BRECQ share: the config, and a result saved as int8 codes per site."""

    def __init__(self, config):
        self.config = config
        self.result = R.Result()

    def state_dict(self):
        return self.result.state_dict()

    def load_state_dict(self, state, ctx):
        self.result = R.Result()
        self.result.load_state_dict(state, ctx)


@register_transform("adaround", stage="after_calibration", order=20,
                    summary="learn each weight's up/down rounding, layer by layer (AdaRound)")
class AdaRound(RoundingPass):
    def check(self, model):
        check_has_layers(model, self.config, "adaround")

    def apply(self, ctx):
        points = reconstructable_points(ctx, "adaround")
        self.result = R.Result()
        recorders, order = record_fp32(ctx, points)
        by_name = {p.name: p for p in points}
        generator = torch.Generator().manual_seed(ctx.config.seed)
        for name in tqdm(order, desc="adaround", disable=not ctx.progress):
            reconstruct_layer(ctx, by_name[name], recorders.pop(name).parts, self.result, generator)
        ctx.report.notes.append(self.result.note("adaround", f"{len(self.result.losses)} layers",
                                                 skipped_sites(ctx, points)))
