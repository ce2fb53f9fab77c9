"""Quantize SpeechBrain pretrained interfaces (``EncoderClassifier``, ``EncoderASR``,
``SpeakerRecognition``, ``SpectralMaskEnhancement``, …) loaded from a local folder.

Interfaces keep their modules in ``.mods``; the result is a shallow copy of the
interface whose ``.mods`` is the quantized copy, so the FP32 interface keeps
working unchanged.
"""
import copy

from ..core.config import QuantConfig
from .binding import bound_modules


def quantize_interface(interface, config=None, forward_loop=None, objective=None, progress=True):
    """Return a quantized copy of a pretrained interface.

    Arguments
    ---------
    interface : speechbrain.inference.interfaces.Pretrained
    config : QuantConfig
    forward_loop : callable
        ``forward_loop(interface)`` runs calibration audio through the
        interface's own methods (``classify_batch``, ``encode_batch``,
        ``transcribe_batch``, ``enhance_batch``…).
    objective : callable
        ``objective(interface) -> float``, the task error on the calibration
        audio (required by ``esc``).

    Returns
    -------
    Pretrained
        A copy sharing everything but ``.mods`` (and ``hparams`` entries
        that referred to them); ``.esc_report`` holds the report.

    Example
    -------
    >>> import torch, types
    >>> from speechbrain.inference.interfaces import Pretrained
    >>> mods = {"enc": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))}
    >>> iface = Pretrained(modules=mods, hparams={}, freeze_params=True)
    >>> x = torch.randn(3, 4)
    >>> q = quantize_interface(iface, QuantConfig(method="max"), lambda i: i.mods.enc(x), progress=False)
    >>> q.mods is not iface.mods, len(q.esc_report.quantized_ops)
    (True, 2)
    """
    from ..core.api import quantize  # modelopt: imported only when used
    mods = interface.mods

    def wrap(fn):
        if fn is None:
            return None

        def call(qmods):
            with bound_modules(interface, qmods, attr="mods"):
                return fn(interface)
        return call

    qmods = quantize(mods, config or QuantConfig(), wrap(forward_loop), wrap(objective), progress=progress)
    result = copy.copy(interface)
    for registry in ("_modules", "_parameters", "_buffers"):
        # Pretrained is an nn.Module: a shallow copy would share (and so change) its registries.
        if registry in vars(interface):
            setattr(result, registry, dict(vars(interface)[registry]))
    with bound_modules(interface, qmods, attr="mods"):
        # Snapshot the re-pointed hparams into the copy.
        result.hparams = copy.copy(interface.hparams)
    result.mods = qmods
    result.__dict__["esc_report"] = qmods.esc_report
    return result
