"""``entropy``: TensorRT's KL-divergence clip of each |x| histogram."""
from ..histogram import entropy_amax
from ..registry import register_calibrator


@register_calibrator("entropy", needs=("histogram",), summary="TensorRT entropy (KL) clip")
class EntropyCalibrator:
    def __init__(self, config):
        self.config = config

    def calibrate(self, ctx):
        return ctx.per_site_histogram(lambda h, e: entropy_amax(h, e, self.config.act_bits))
