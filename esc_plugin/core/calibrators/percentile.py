"""``percentile``: clip each activation at a percentile of its |x| histogram.

With an objective, every candidate percentile in ``QuantConfig.percentiles``
is scored and the best is kept (one evaluation each); without one, the first
is used and the report says so.
"""
from ..histogram import percentile_amax
from ..registry import register_calibrator


@register_calibrator("percentile", needs=("histogram",), objective="optional",
                     summary="percentile clip of |x| (best of config.percentiles on the objective)")
class PercentileCalibrator:
    def __init__(self, config):
        self.config = config
        self.chosen = None

    def calibrate(self, ctx):
        candidates = {pc: ctx.per_site_histogram(lambda h, e, pc=pc: percentile_amax(h, e, pc))
                      for pc in self.config.percentiles}
        if not ctx.has_objective:
            self.chosen = self.config.percentiles[0]
            ctx.report.notes.append(f"percentile: no objective given, used {self.chosen} without selection")
        else:
            scores = {pc: ctx.evaluate(a) for pc, a in candidates.items()}
            self.chosen = min(scores, key=scores.get)
            ctx.report.objective.update({f"percentile_{pc}": v for pc, v in scores.items()})
        ctx.report.notes.append(f"percentile: chose {self.chosen}")
        return candidates[self.chosen]

    def state_dict(self):
        return {"chosen": self.chosen}

    def load_state_dict(self, state):
        self.chosen = state.get("chosen")
