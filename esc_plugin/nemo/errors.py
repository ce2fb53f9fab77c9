"""Errors of the NeMo integration; each message names the fix."""
from ..core.errors import CalibrationError, ConfigError, QuantizationError


class ManifestError(CalibrationError):
    """A NeMo manifest is missing, malformed, or holds too few utterances."""


class NemoModelError(QuantizationError):
    """The NeMo model (or .nemo file) is not one the integration can quantize / restore."""


__all__ = ["ManifestError", "NemoModelError", "ConfigError"]
