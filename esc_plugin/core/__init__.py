"""Toolkit-agnostic core: quantizers, calibrators, the ESC optimizer, reports."""
from .api import load, quantize, save
from .config import METHODS, QuantConfig
from .errors import CalibrationError, ConfigError, ObjectiveError, QuantizationError
from .report import QuantReport
from .search import ScaleSearch

__all__ = ["quantize", "save", "load", "QuantConfig", "QuantReport", "ScaleSearch", "METHODS",
           "QuantizationError", "ConfigError", "CalibrationError", "ObjectiveError"]
