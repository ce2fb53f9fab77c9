"""SpeechBrain integration: ``quantize: esc`` as a recipe stage, and pretrained interfaces.

Depends on :mod:`esc_plugin.core`; the core never imports this package.
"""
from .binding import bound_modules
from .interfaces import quantize_interface
from .settings import StageSettings, read_settings
from .saved import load_quantized, save_quantized
from .stage import StageResult, quantize_brain

__all__ = ["quantize_brain", "load_quantized", "save_quantized", "StageResult", "bound_modules",
           "read_settings", "StageSettings", "quantize_interface"]
