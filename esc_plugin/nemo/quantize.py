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
import dataclasses

import esc_plugin as esc

from ..core.config import QuantConfig
from ._modules import check_ctc_model, quantizable
from .errors import ConfigError
from .features import ASRFeatureCache
from .manifest import read_manifest
from .model import QuantizedASRModel, is_quantized_asr_model
from .save_restore import as_quantized_asr_model

#: Module-name patterns always left in float: the audio front end.
FLOAT_MODULES = ("preprocessor",)
PREPROCESSOR_REASON = ("audio front end (mel spectrogram): kept in float by esc_plugin.nemo; its "
                       "features are computed once and cached")


def quantize_choices():
    """Values of the recipe's ``quantize:`` key: every registered calibrator and named preset,
    read from the registry now (so a calibrator registered by the user is accepted)."""
    from ..core.presets import preset_names
    return preset_names()


def quantization_config(quantize="esc", bits=8, **options):
    """``QuantConfig`` for the recipe's ``quantize: <name>`` key (a calibrator or a preset such
    as ``esc_paper``), with a clear error for unknown values.

    Example
    -------
    >>> quantization_config("esc", bits=8, budget=50).budget
    50
    >>> quantization_config("esc_paper", bits=4).init
    'output_mse'
    >>> quantization_config("best")
    Traceback (most recent call last):
    ...
    esc_plugin.core.errors.ConfigError: quantize='best' is unknown: choose one of max, percentile, entropy, mse, esc, stablequant, output_mse, esc_paper, esc_initbest.
    """
    from ..core.presets import config_for
    choices = quantize_choices()
    if quantize not in choices:
        raise ConfigError(f"quantize={quantize!r} is unknown: choose one of {', '.join(choices)}.")
    return config_for(quantize, bits=bits, **options)


def float_patterns(asr_model, config):
    """``config.exclude`` plus the preprocessor."""
    extra = [p for p in FLOAT_MODULES if p not in config.exclude]
    return tuple(config.exclude) + tuple(extra)


def quantize_asr_model(asr_model, config=None, *, manifest, n_samples=None, batch_size=16,
                       data_config=None, use_cer=False, objective="metric", progress=True):
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
    objective : str
        ``"metric"`` (NeMo's WER / CER against the manifest's transcripts) or
        ``"distill"`` (label-free: the distance of the quantized encoder /
        decoder outputs to the FP32 ones on the calibration audio; the
        transcripts are then only used to report the WER).
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
    if objective not in ("metric", "distill"):
        raise ConfigError(f"objective={objective!r}: use 'metric' (NeMo's WER/CER) or 'distill' (label-free).")
    n_samples = int(n_samples or config.n_samples)
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} must be >= 1.")
    read_manifest(manifest, min_rows=n_samples)  # bad input fails here, before any work
    config = dataclasses.replace(config, n_samples=n_samples, exclude=float_patterns(asr_model, config))

    features = ASRFeatureCache.from_manifest(asr_model, manifest, n_samples, batch_size, data_config,
                                             use_cer, progress)
    with quantizable(asr_model):
        fp32_objective = features.word_error_rate(asr_model)
        qmodel = esc.quantize(asr_model, config, features.forward_loop,
                              features.split_objective() if objective == "metric" else None, progress=progress)
    qmodel = as_quantized_asr_model(qmodel)
    report = qmodel.esc_report
    report.objective["fp32"] = fp32_objective
    for row in report.coverage:
        if row["name"] in FLOAT_MODULES:
            row["reason"] = PREPROCESSOR_REASON
    if objective == "metric":
        report.notes.append(f"objective: NeMo {'CER' if use_cer else 'WER'} on the first {n_samples} "
                            f"utterances of {manifest} (FP32: {fp32_objective:.4g})")
    else:
        report.objective["calibration_wer"] = features.word_error_rate(qmodel)
    qmodel.__dict__["esc_features"] = features
    return qmodel


def __getattr__(name):
    # Former constant, now read from the registry on each access.
    if name == "QUANTIZE_CHOICES":
        return quantize_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["quantize_asr_model", "quantization_config", "quantize_choices", "float_patterns",
           # re-exported from their own modules (former home of these names)
           "QuantizedASRModel", "is_quantized_asr_model", "as_quantized_asr_model", "quantizable"]
