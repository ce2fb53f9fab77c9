"""Quantize a NeMo CTC ASR model with esc_plugin (``quantize: esc`` in the recipe config).

>>> import esc_plugin as esc
>>> from esc_plugin.nemo import quantize_asr_model
>>> qasr = quantize_asr_model(asr_model, esc.QuantConfig(bits=8, method="esc", budget=100),
...                           manifest="calibration.json", n_samples=100)      # doctest: +SKIP

The quantized model is a copy of the FP32 model (which is left as it was) whose
class is ``Quantized<EncDecCTCModel>``: an :class:`QuantizedASRModel` mixin on the
original class, so NeMo's API still applies and ``save_to`` / ``export`` /
``restore_from`` keep the quantizers (see :mod:`esc_plugin.nemo.save_restore`
and :mod:`esc_plugin.nemo.export`).
"""
import contextlib
import dataclasses

import esc_plugin as esc

from ..core.config import METHODS, QuantConfig
from ._modules import check_ctc_model, evaluation_mode, rebind_copied_forwards, without_training_state
from .errors import ConfigError
from .features import ASRFeatureCache
from .manifest import read_manifest

#: Values of the recipe's ``quantize:`` key (the calibration methods).
QUANTIZE_CHOICES = METHODS
#: Module-name patterns always left in float: the audio front end.
FLOAT_MODULES = ("preprocessor",)
PREPROCESSOR_REASON = ("audio front end (mel spectrogram): kept in float by esc_plugin.nemo; its "
                       "features are computed once and cached")


def quantization_config(quantize="esc", bits=8, **options):
    """``QuantConfig`` for the recipe's ``quantize: <method>`` key, with a clear error for unknown values.

    Example
    -------
    >>> quantization_config("esc", bits=8, budget=50).budget
    50
    >>> quantization_config("best")
    Traceback (most recent call last):
    ...
    esc_plugin.core.errors.ConfigError: quantize='best' is unknown: choose one of max, percentile, entropy, mse, esc.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize={quantize!r} is unknown: choose one of {', '.join(QUANTIZE_CHOICES)}.")
    return QuantConfig(bits=bits, method=quantize, **options)


class QuantizedASRModel:
    """Mixin of quantized NeMo ASR models: ``save_to`` keeps the scales, ``export`` writes Q/DQ.

    Not instantiated directly: :func:`quantize_asr_model` and
    :func:`~esc_plugin.nemo.restore_quantized_asr_model` return models of the class
    ``Quantized<OriginalClass>``.
    """

    def save_to(self, save_path):
        """Save to a new ``.nemo`` (FP32 weights, config, and the esc_plugin state); atomic.

        Refuses to overwrite a ``.nemo`` that holds no esc_plugin state (an FP32 model).
        """
        from .save_restore import save_quantized_asr_model
        return save_quantized_asr_model(self, save_path)

    def export(self, output, input_example=None, verbose=False, do_constant_folding=True,
               onnx_opset_version=None, check_trace=False, dynamic_axes=None, check_tolerance=0.01,
               export_modules_as_functions=False, keep_initializers_as_inputs=None, use_dynamo=False,
               mode="qdq", clip_activations=False):
        """NeMo's ``export`` with the quantizers written as QuantizeLinear / DequantizeLinear.

        Same arguments as NeMo's ``Exportable.export`` plus ``mode`` / ``clip_activations``
        of :func:`esc_plugin.export.export_qdq_onnx`. See :mod:`esc_plugin.nemo.export`.
        """
        from .export import export_quantized_asr_model
        return export_quantized_asr_model(
            self, output, input_example=input_example, verbose=verbose,
            do_constant_folding=do_constant_folding, onnx_opset_version=onnx_opset_version,
            check_trace=check_trace, dynamic_axes=dynamic_axes, check_tolerance=check_tolerance,
            export_modules_as_functions=export_modules_as_functions,
            keep_initializers_as_inputs=keep_initializers_as_inputs, use_dynamo=use_dynamo,
            mode=mode, clip_activations=clip_activations)


_CLASSES = {}


def _quantized_class(cls):
    if issubclass(cls, QuantizedASRModel):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type("Quantized" + cls.__name__, (QuantizedASRModel, cls), {"__module__": __name__})
    return _CLASSES[cls]


def is_quantized_asr_model(model):
    """True for models returned by :func:`quantize_asr_model` / ``restore_quantized_asr_model``."""
    return isinstance(model, QuantizedASRModel) and model.__dict__.get("esc_plan") is not None


def as_quantized_asr_model(qmodel):
    """Give a model from ``esc.quantize`` / ``esc.load`` the quantized NeMo class and connector."""
    from .save_restore import QuantizedSaveRestoreConnector
    rebind_copied_forwards(qmodel)  # the copy's mel front end must run the copy, not the FP32 model
    qmodel.__class__ = _quantized_class(type(qmodel))
    qmodel._save_restore_connector = QuantizedSaveRestoreConnector()
    return qmodel


def float_patterns(asr_model, config):
    """``config.exclude`` plus the preprocessor."""
    extra = [p for p in FLOAT_MODULES if p not in config.exclude]
    return tuple(config.exclude) + tuple(extra)


@contextlib.contextmanager
def quantizable(asr_model):
    """The FP32 model prepared for ``esc.quantize`` / ``esc.load`` (restored on exit)."""
    with without_training_state(asr_model), evaluation_mode(asr_model):
        yield asr_model


def quantize_asr_model(asr_model, config=None, *, manifest, n_samples=None, batch_size=16,
                       data_config=None, use_cer=False, progress=True):
    """Quantize a NeMo CTC ASR model; returns a quantized copy (the FP32 model is left as it was).

    Arguments
    ---------
    asr_model : nemo.collections.asr.models.EncDecCTCModel
        FP32 model (``EncDecCTCModel``, ``EncDecCTCModelBPE``; any encoder).
    config : esc_plugin.QuantConfig
        Bits and calibrator (default W8A8 ESC). The preprocessor is always added
        to ``exclude`` (float, listed in the coverage report).
    manifest : str or Path
        NeMo JSON-lines calibration manifest.
    n_samples : int, optional
        Calibration utterances: the manifest's first ``n_samples`` (default
        ``config.n_samples``, 100). A manifest with fewer raises before any work.
    batch_size : int
        Batch size of the calibration passes.
    data_config : dict, optional
        Overrides of the NeMo data config (e.g. ``{"max_duration": 20}``).
    use_cer : bool
        ESC objective = CER instead of WER.
    progress : bool
        tqdm bars.

    Returns
    -------
    QuantizedASRModel
        ``Quantized<cls>`` instance with ``.esc_report`` (objective = NeMo WER of
        the calibration utterances; ``objective["fp32"]`` holds the FP32 value)
        and ``.esc_features`` (the cached calibration features).
    """
    check_ctc_model(asr_model)
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an esc_plugin.QuantConfig, got {type(config).__name__}; "
                          "build one with esc_plugin.nemo.quantization_config('esc', bits=8).")
    n_samples = int(n_samples or config.n_samples)
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} must be >= 1.")
    read_manifest(manifest, min_rows=n_samples)  # bad input fails here, before any work
    config = dataclasses.replace(config, n_samples=n_samples, exclude=float_patterns(asr_model, config))

    features = ASRFeatureCache.from_manifest(asr_model, manifest, n_samples, batch_size, data_config,
                                             use_cer, progress)
    with quantizable(asr_model):
        fp32_objective = features.word_error_rate(asr_model)
        qmodel = esc.quantize(asr_model, config, features.forward_loop, features.word_error_rate,
                              progress=progress)
    qmodel = as_quantized_asr_model(qmodel)
    report = qmodel.esc_report
    report.objective["fp32"] = fp32_objective
    for row in report.coverage:
        if row["name"] in FLOAT_MODULES:
            row["reason"] = PREPROCESSOR_REASON
    report.notes.append(f"objective: NeMo {'CER' if use_cer else 'WER'} on the first {n_samples} "
                        f"utterances of {manifest} (FP32: {fp32_objective:.4g})")
    qmodel.__dict__["esc_features"] = features
    return qmodel
