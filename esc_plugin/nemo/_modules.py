"""Model-level helpers: NeMo import, evaluation mode, deep-copy preparation.

NeMo's ``CausalConv1D`` / ``CausalConv2D`` (``nn.Conv1d`` / ``nn.Conv2d``
subclasses that pad in their own ``forward``) need nothing here: the core's
conv wrapper quantizes inside ``_conv_forward`` and keeps the subclass's
``forward``.
"""
import contextlib

import torch

from .errors import NemoModelError

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
