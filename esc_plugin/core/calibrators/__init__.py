"""Built-in calibrators, one module each; importing this package registers them.

A new calibrator is one module like these (a class decorated with
:func:`esc_plugin.core.registry.register_calibrator`) plus its test.
"""
from . import max, percentile, entropy, mse, esc, stablequant, output_mse  # noqa: F401  (registration order = table order)
