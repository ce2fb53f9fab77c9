"""``mse``: the clip minimising the MSE of the quantized *input* histogram."""
from ..histogram import mse_amax
from ..registry import register_calibrator


@register_calibrator("mse", needs=("histogram",), summary="MSE of the quantized input histogram")
class MseCalibrator:
    def __init__(self, config):
        self.config = config

    def calibrate(self, ctx):
        return ctx.per_site_histogram(lambda h, e: mse_amax(h, e, self.config.act_bits))
