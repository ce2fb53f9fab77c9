"""Model-level helpers: NeMo import, evaluation mode, and NeMo modules the core cannot wrap as is.

Why :func:`quantizable_subclass_convs` exists: the core wraps a module by
swapping its class for ``Quant<cls>``, whose ``forward(x)`` comes first in the
method order. NeMo's ``CausalConv1D`` / ``CausalConv2D`` (the Conformer's
depthwise convolution, causal subsampling) are ``nn.Conv1d`` / ``nn.Conv2d``
subclasses whose own ``forward`` pads the input (and takes a ``cache``
argument) before the convolution: wrapped as is, the padding is skipped and
``depthwise_conv(x, cache=None)`` raises. While the context is active each such
module gets an instance ``forward`` that pads as NeMo does and then runs the
(quantized, once wrapped) convolution; a deep copy made inside (the quantized
model) keeps it, the FP32 model loses it on exit. Any other subclass of a
wrappable type with its own ``forward`` is returned so it can be left in float.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import NemoModelError

_WRAPPABLE_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)


def import_nemo_asr():
    """``nemo.collections.asr`` (imported on first use: it takes 15-30 s), with an install hint."""
    try:
        import nemo.collections.asr as nemo_asr
    except ImportError as exc:
        raise NemoModelError("NeMo is not installed: pip install 'esc_plugin[nemo]' "
                             "(nemo_toolkit[asr]==3.0.0).") from exc
    return nemo_asr


def check_ctc_model(asr_model):
    """Raise :class:`NemoModelError` unless ``asr_model`` is a NeMo CTC ASR model."""
    nemo_asr = import_nemo_asr()
    ctc = nemo_asr.models.EncDecCTCModel
    if not isinstance(asr_model, ctc):
        raise NemoModelError(
            f"{type(asr_model).__name__} is not a NeMo CTC ASR model: esc_plugin.nemo quantizes "
            "EncDecCTCModel / EncDecCTCModelBPE (any encoder: Conformer, FastConformer, Citrinet, "
            "QuartzNet...). For a hybrid RNNT/CTC model, quantize its CTC branch after "
            "model.change_decoding_strategy(decoder_type='ctc') is not supported yet."
        )
    for part in ("preprocessor", "encoder", "decoder", "decoding"):
        if getattr(asr_model, part, None) is None:
            raise NemoModelError(f"{type(asr_model).__name__} has no '{part}': build it from a full "
                                 "NeMo model config (preprocessor, encoder, decoder, decoding).")
    return asr_model


@contextlib.contextmanager
def evaluation_mode(module):
    """``module.eval()`` inside the block; every submodule's previous mode is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _is_instrumentation(model, name, value):
    """An instance attribute that wraps one of the class's methods (e.g. a ``wrapt`` proxy)."""
    try:
        import wrapt
        proxy = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)  # wrapt 2 / wrapt 1
        if isinstance(value, proxy):
            return True
    except ImportError:  # pragma: no cover (a NeMo dependency)
        pass
    return callable(value) and callable(getattr(type(model), name, None))


@contextlib.contextmanager
def without_training_state(asr_model):
    """Detach the Lightning trainer, dataloaders, optimizer and instrumentation while the model is
    deep-copied (``esc.quantize`` / ``esc.load`` copy it); restored on exit.

    A copy of the trainer or of the training data is useless, and some of it cannot be
    copied: after ``trainer.fit`` NeMo's telemetry (nv_one_logger) wraps the instance's
    ``training_step`` in a ``wrapt`` proxy, and proxies refuse ``deepcopy``.
    """
    names = ("_trainer", "_train_dl", "_validation_dl", "_test_dl", "_optimizer", "_scheduler")
    state = asr_model.__dict__
    saved = {n: state[n] for n in names if state.get(n) is not None}
    saved.update({k: v for k, v in state.items()
                  if k not in saved and not k.startswith("_") and _is_instrumentation(asr_model, k, v)})
    for n in saved:
        if n in names:
            state[n] = None
        else:
            del state[n]
    try:
        yield asr_model
    finally:
        state.update(saved)


def _conv(module, x):
    """The module's convolution (quantized once the core has wrapped it), without its own padding."""
    from ..core.modules import QuantMixin
    if isinstance(module, QuantMixin):
        return QuantMixin.forward(module, x)
    base = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
    return base.forward(module, x)


def _causal_conv1d_forward(self, x, cache=None):
    x, cache = self.update_cache(x, cache=cache)
    y = _conv(self, x)
    return y if cache is None else (y, cache)


def _causal_conv2d_forward(self, x):
    x = F.pad(x, pad=(self._left_padding, self._right_padding, self._left_padding, self._right_padding))
    return _conv(self, x)


def _padded_forwards():
    from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D, CausalConv2D
    return {CausalConv1D: _causal_conv1d_forward, CausalConv2D: _causal_conv2d_forward}


def subclasses_with_own_forward(model):
    """Names of modules of a wrappable type (Linear, Conv1d/2d, LayerNorm subclasses) whose
    class overrides ``forward`` and that :func:`quantizable_subclass_convs` does not handle:
    the integration leaves them in float (the core's wrapper would skip their ``forward``)."""
    from ..core.modules import QuantMixin
    handled = tuple(_padded_forwards()) + (QuantMixin,)
    names = []
    for name, m in model.named_modules():
        base = next((b for b in _WRAPPABLE_BASES if isinstance(m, b)), None)
        if base is not None and type(m).forward is not base.forward and not isinstance(m, handled):
            names.append(name)
    return names


@contextlib.contextmanager
def quantizable_subclass_convs(model):
    """See the module doc. Yields the number of modules given an instance ``forward``."""
    forwards = _padded_forwards()
    patched = []
    try:
        for m in model.modules():
            for cls, fn in forwards.items():
                if isinstance(m, cls) and "forward" not in m.__dict__:
                    m.__dict__["forward"] = fn.__get__(m)
                    patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def rebind_copied_forwards(model):
    """Point decorated instance ``forward`` attributes of a deep copy back at the copy.

    NeMo's ``FilterbankFeatures`` (the mel front end) sets
    ``self.forward = torch.no_grad()(self.forward)`` in ``__init__``: an instance
    attribute wrapping a bound method. ``copy.deepcopy`` copies the wrapper
    function by reference, so the copy's featurizer would keep running the
    *original* module (its mode included: a training-mode original dithers the
    copy's features). Each such wrapper (``__wrapped__`` bound to another object)
    is rebuilt around the copy's own method. Returns the number rebound.
    """
    import types

    n = 0
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        wrapped = getattr(fwd, "__wrapped__", None)
        if isinstance(wrapped, types.MethodType) and wrapped.__self__ is not m:
            m.__dict__["forward"] = torch.no_grad()(types.MethodType(wrapped.__func__, m))
            n += 1
    return n
