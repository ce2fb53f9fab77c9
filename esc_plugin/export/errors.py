"""Errors of the deployment path; each message names the fix."""
from ..core.errors import QuantizationError


class ExportError(QuantizationError):
    """The quantized model cannot be exported / built / run as asked."""
