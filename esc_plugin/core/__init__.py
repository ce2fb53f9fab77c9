"""Toolkit-agnostic core: quantizers, calibrators, the ESC optimizer, reports.

Names load on first use (PEP 562): ``quantize`` / ``save`` / ``load`` pull in
modelopt (~15 s), which ``QuantConfig`` and the errors do not need.
"""
import importlib

_WHERE = {"quantize": "api", "save": "api", "load": "api", "QuantConfig": "config", "METHODS": "config",
          "register_calibrator": "registry", "register_transform": "registry",
          "calibrator_names": "registry", "transform_names": "registry", "CalibrationContext": "context",
          "preset_names": "presets", "SplitObjective": "selection", "config_for": "presets", "label_of": "presets",
          "QuantReport": "report", "ScaleSearch": "search", "QuantizationError": "errors",
          "ConfigError": "errors", "CalibrationError": "errors", "ObjectiveError": "errors",
          "keep_freed_memory": "allocator"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'esc_plugin.core' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
