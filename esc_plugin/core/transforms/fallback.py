"""Accuracy-aware fallback: leave the most sensitive quantized ops in float.

What Intel Neural Compressor and NNCF call accuracy control. After
calibration, each active site is scored with only that site in float (its
input quantizer, and its own weight quantizer, off): its *sensitivity* is how
much the objective improves. Then either the ``fallback_layers`` most
sensitive sites stay in float, or (``max_drop``) the most sensitive ones are
put back in float one by one until the objective is within ``max_drop`` of
the FP32 model's (an absolute margin on the objective: 0.01 is one point of
error rate when the objective is an error fraction). The held-back part of a
split objective is used when there is one. They are listed in the coverage
report as float, with their sensitivity rank.

Enabled by ``QuantConfig(fallback_layers=k)`` or ``QuantConfig(max_drop=d)``,
which add ``"fallback"`` to ``ptq``. Costs one evaluation per site, one for
the FP32 reference and one per site put back.
"""
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..float_sites import to_float as _to_float
from ..registry import register_transform


def _score(ctx):
    value = ctx.evaluate(None)
    selection = ctx.evaluator.last_selection
    return selection if selection is not None else value


@register_transform("fallback", stage="after_calibration", order=90,
                    summary="leave the most sensitive quantized ops in float (accuracy control)")
class Fallback:
    def __init__(self, config):
        self.k, self.max_drop = config.fallback_layers, config.max_drop
        self.names = []

    def apply(self, ctx):
        if not ctx.has_objective:
            raise CalibrationError("fallback needs an objective to rank the ops: pass one, or keep the "
                                   "default distillation objective (no objective argument).")
        sites = [p for p in ctx.sites if p.input_quantizer.is_enabled]
        base = _score(ctx)
        ranking = []
        for p in tqdm(sites, desc="fallback: sensitivity", disable=not ctx.progress):
            _to_float(p, True)
            ranking.append((base - _score(ctx), p))
            _to_float(p, False)
        ranking.sort(key=lambda gp: -gp[0])
        ctx.report.sensitivity = [{"name": p.name, "op": p.op, "gain": g, "rank": r + 1}
                                  for r, (g, p) in enumerate(ranking)]
        chosen = [p for _, p in ranking[:self.k]]
        for p in chosen:
            _to_float(p, True)
        if self.max_drop is not None:
            target = self._fp32_score(ctx) + self.max_drop
            score = _score(ctx)
            for _, p in ranking[len(chosen):]:
                if score <= target:
                    break
                _to_float(p, True)
                chosen.append(p)
                score = _score(ctx)
            ctx.report.objective["fallback_target"] = target
            ctx.report.objective["fallback_reached"] = score
        self.names = [p.name for p in chosen]
        self._mark(ctx)

    @staticmethod
    def _fp32_score(ctx):
        off = [p for p in ctx.sites if p.input_quantizer.is_enabled]
        for p in off:
            _to_float(p, True)
        try:
            return _score(ctx)
        finally:
            for p in off:
                _to_float(p, False)

    def _mark(self, ctx):
        rank = {s["name"]: s["rank"] for s in ctx.report.sensitivity}
        for entry in ctx.report.coverage:
            if entry["name"] in self.names:
                entry["quantized"] = False
                entry["reason"] = f"accuracy fallback: left in float (sensitivity rank {rank[entry['name']]})"
        for p in ctx.plan.points:
            if p.name in self.names:
                p.fallback = True
        ctx.report.notes.append(f"fallback: left {len(self.names)} op(s) in float: {self.names}")

    def state_dict(self):
        return {"names": list(self.names)}

    def load_state_dict(self, state, ctx):
        self.names = list(state["names"])
        for p in ctx.plan.points:
            if p.name in self.names:
                _to_float(p, True)
                p.fallback = True
