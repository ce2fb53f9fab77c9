"""``output_mse``: ESC's step 1 alone, the per-layer scale minimising the layer *output* MSE (Eq. 4).

A row of its own so tables show what the search adds over its start, and the
selection guard's promise (the chosen scales are never worse than the local
init on held-out data) can be checked on test metrics, not only on the
calibration objective.
"""
from ..local_init import local_init
from ..registry import register_calibrator


@register_calibrator("output_mse", needs=("max", "samples"),
                     summary="ESC's local init alone: per-layer output-MSE scale (no search)")
class OutputMseCalibrator:
    def __init__(self, config):
        self.config = config

    def calibrate(self, ctx):
        return local_init(ctx)
