"""``max``: the observed max |x| of each activation (the plain baseline)."""
from ..registry import register_calibrator


@register_calibrator("max", needs=("max",), summary="observed max |x| per activation")
class MaxCalibrator:
    def __init__(self, config):
        self.config = config

    def calibrate(self, ctx):
        return ctx.maxes.copy()
