"""Built-in PTQ passes (``QuantConfig(ptq=(...))``); importing this package registers them.

A new pass is one module like these (a class decorated with
:func:`esc_plugin.core.registry.register_transform`) plus its test.
"""
from . import smoothquant, weight_clip, bias_correction, fallback  # noqa: F401
from . import adaround, brecq  # noqa: F401  (weight rounding, after_calibration order 20)
from . import noisyquant, hyq  # noqa: F401  (activation PTQ: after_calibration order 10; before_calibration order 55)
