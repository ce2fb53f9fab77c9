"""NeMo-specific model helpers: NeMo import, CTC check, deep-copy preparation.

The generic copy / rebind helpers (:func:`evaluation_mode`,
:func:`rebind_copied_forwards`, :func:`~esc_plugin.binding.detached_attributes`)
live in :mod:`esc_plugin.binding` and are re-exported here.

NeMo's ``CausalConv1D`` / ``CausalConv2D`` (``nn.Conv1d`` / ``nn.Conv2d``
subclasses that pad in their own ``forward``) need nothing here: the core's
conv wrapper quantizes inside ``_conv_forward`` and keeps the subclass's
``forward``.
"""
import contextlib

from ..binding import detached_attributes, evaluation_mode, is_instrumentation, rebind_copied_forwards
from .errors import NemoModelError

#: ModelPT attributes a deep copy must not take: the Lightning trainer, its data and optimizer.
TRAINING_STATE = ("_trainer", "_train_dl", "_validation_dl", "_test_dl", "_optimizer", "_scheduler")


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


def without_training_state(asr_model):
    """Detach the Lightning trainer, dataloaders, optimizer and instrumentation while the model is
    deep-copied (``esc.quantize`` / ``esc.load`` copy it); restored on exit.

    A copy of the trainer or of the training data is useless, and some of it cannot be
    copied: after ``trainer.fit`` NeMo's telemetry (nv_one_logger) wraps the instance's
    ``training_step`` in a ``wrapt`` proxy, and proxies refuse ``deepcopy``.
    """
    return detached_attributes(asr_model, TRAINING_STATE, instrumentation=True)


@contextlib.contextmanager
def quantizable(asr_model):
    """The FP32 model prepared for ``esc.quantize`` / ``esc.load`` (restored on exit):
    no training state, eval mode."""
    with without_training_state(asr_model), evaluation_mode(asr_model):
        yield asr_model


_is_instrumentation = is_instrumentation  # former private name

__all__ = ["import_nemo_asr", "check_ctc_model", "without_training_state", "evaluation_mode",
           "rebind_copied_forwards", "quantizable", "TRAINING_STATE"]
