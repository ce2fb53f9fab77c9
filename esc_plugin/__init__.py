"""esc_plugin: low-bit post-training quantization for speech models (ESC, arXiv 2603.08173).

>>> import esc_plugin as esc
>>> esc.QuantConfig(bits=4, method="esc").act_bits
4

The core (and modelopt, which takes ~10 s to import) loads on first use, so
``esc_plugin.metrics`` stays light.
"""
import importlib
import os as _os
import warnings as _warnings

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# modelopt warns about untested transformers versions and CUDA-less machines on import.
_warnings.filterwarnings("ignore", module="modelopt")
_warnings.filterwarnings("ignore", message=".*transformers .* is not tested with current version of modelopt.*")

__version__ = "0.1.0"
__all__ = ["quantize", "save", "load", "QuantConfig", "QuantReport", "ScaleSearch", "METHODS",
           "register_calibrator", "register_transform", "calibrator_names", "transform_names",
           "CalibrationContext", "SplitObjective", "preset_names", "config_for", "label_of",
           "QuantizationError", "ConfigError", "CalibrationError", "ObjectiveError", "keep_freed_memory"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".core", __name__), name)
    raise AttributeError(f"module 'esc_plugin' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
