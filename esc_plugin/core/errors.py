"""Errors raised by esc_plugin; each message names the fix."""


class QuantizationError(RuntimeError):
    """Base class: something about the model, data or config prevents quantization."""


class ConfigError(ValueError):
    """A configuration value is not supported."""


class CalibrationError(QuantizationError):
    """Calibration could not run (no data seen, objective missing or failing)."""


class ObjectiveError(CalibrationError):
    """The user's objective raised while ESC was evaluating a candidate."""
