"""NeMo integration: quantize, save / restore and export NeMo ASR models with esc_plugin.

>>> import esc_plugin as esc, esc_plugin.nemo as esc_nemo
>>> from nemo.collections.asr.models import ASRModel                                   # doctest: +SKIP
>>> asr = ASRModel.restore_from("conformer_ctc.nemo")                                  # doctest: +SKIP
>>> qasr = esc_nemo.quantize_asr_model(asr, esc.QuantConfig(bits=8, method="esc"),
...                                    manifest="calibration.json", n_samples=100)    # doctest: +SKIP
>>> qasr.save_to("conformer_ctc_w8a8.nemo")        # FP32 weights + scales; FP32 .nemo untouched  # doctest: +SKIP
>>> qasr = esc_nemo.restore_quantized_asr_model("conformer_ctc_w8a8.nemo")            # doctest: +SKIP
>>> qasr.export("conformer_ctc_w8a8.onnx")         # QuantizeLinear / DequantizeLinear graph   # doctest: +SKIP

* The calibration data goes through NeMo's own dataloader (the model's
  ``_setup_dataloader_from_config`` on a copy of its test / validation data
  config pointed at the manifest) and NeMo's own ``WER`` metric with the
  model's decoding is the ESC objective.
* The preprocessor (``AudioToMelSpectrogramPreprocessor``) stays in float and
  its features are computed once (they do not depend on the scales); each
  objective evaluation reruns only encoder + decoder.
* NeMo is imported on first use (it takes 15-30 s), so importing this package is cheap.
"""
import importlib

from .errors import ConfigError, ManifestError, NemoModelError
from .manifest import (SPEECH_COMMANDS_WORDS, read_manifest, speech_commands_manifests,
                       split_by_speaker, write_manifest)

_LAZY = {
    "quantize_asr_model": ".quantize",
    "QUANTIZE_CHOICES": ".quantize",
    "quantize_choices": ".quantize",
    "quantization_config": ".quantize",
    "is_quantized_asr_model": ".model",
    "QuantizedASRModel": ".model",
    "ASRFeatureCache": ".features",
    "save_quantized_asr_model": ".save_restore",
    "restore_quantized_asr_model": ".save_restore",
    "QuantizedSaveRestoreConnector": ".save_restore",
    "export_quantized_asr_model": ".export",
    "encoder_positions": ".export",
}

__all__ = ["ConfigError", "ManifestError", "NemoModelError", "SPEECH_COMMANDS_WORDS", "read_manifest",
           "speech_commands_manifests", "split_by_speaker", "write_manifest"] + sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'esc_plugin.nemo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
