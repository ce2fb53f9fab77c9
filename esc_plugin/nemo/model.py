"""The class of quantized NeMo ASR models: ``Quantized<EncDecCTCModel>``.

A quantized model is a deep copy of the FP32 model whose class is a
:class:`QuantizedASRModel` mixin on the original class, so NeMo's API still
applies and ``save_to`` / ``export`` keep the quantizers.

This module is the bottom of ``esc_plugin.nemo``'s import graph: it imports
no sibling at module level. ``save_to`` / ``export`` reach
:mod:`~esc_plugin.nemo.save_restore` / :mod:`~esc_plugin.nemo.export` when
called (those modules import this one, not the other way round).

Example
-------
>>> import torch
>>> cls = quantized_class(torch.nn.Linear)
>>> cls.__name__, issubclass(cls, QuantizedASRModel), quantized_class(cls) is cls
('QuantizedLinear', True, True)
>>> is_quantized_asr_model(torch.nn.Linear(2, 2))
False
"""

_CLASSES = {}


class QuantizedASRModel:
    """Mixin of quantized NeMo ASR models: ``save_to`` keeps the scales, ``export`` writes Q/DQ.

    Not instantiated directly: :func:`~esc_plugin.nemo.quantize_asr_model` and
    :func:`~esc_plugin.nemo.restore_quantized_asr_model` return models of the class
    ``Quantized<OriginalClass>``.
    """

    def save_to(self, save_path):
        """Save to a new ``.nemo`` (FP32 weights, config, and the esc_plugin state); atomic.

        Refuses to overwrite a ``.nemo`` that holds no esc_plugin state (an FP32 model).
        """
        from .save_restore import save_quantized_asr_model  # call time: save_restore imports this module
        return save_quantized_asr_model(self, save_path)

    def export(self, output, input_example=None, verbose=False, do_constant_folding=True,
               onnx_opset_version=None, check_trace=False, dynamic_axes=None, check_tolerance=0.01,
               export_modules_as_functions=False, keep_initializers_as_inputs=None, use_dynamo=False,
               mode="qdq", clip_activations=False, max_audio_seconds=None):
        """NeMo's ``export`` with the quantizers written as QuantizeLinear / DequantizeLinear.

        Same arguments as NeMo's ``Exportable.export`` plus ``mode`` / ``clip_activations``
        of :func:`esc_plugin.export.export_qdq_onnx` and ``max_audio_seconds`` (the
        positional table's length). See :mod:`esc_plugin.nemo.export`.
        """
        from .export import export_quantized_asr_model  # call time: export imports this module
        return export_quantized_asr_model(
            self, output, input_example=input_example, verbose=verbose,
            do_constant_folding=do_constant_folding, onnx_opset_version=onnx_opset_version,
            check_trace=check_trace, dynamic_axes=dynamic_axes, check_tolerance=check_tolerance,
            export_modules_as_functions=export_modules_as_functions,
            keep_initializers_as_inputs=keep_initializers_as_inputs, use_dynamo=use_dynamo,
            mode=mode, clip_activations=clip_activations, max_audio_seconds=max_audio_seconds)


def quantized_class(cls):
    """``Quantized<cls>`` (one class per original class, so ``isinstance`` checks stay stable)."""
    if issubclass(cls, QuantizedASRModel):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type("Quantized" + cls.__name__, (QuantizedASRModel, cls), {"__module__": __name__})
    return _CLASSES[cls]


def is_quantized_asr_model(model):
    """True for models returned by ``quantize_asr_model`` / ``restore_quantized_asr_model``."""
    return isinstance(model, QuantizedASRModel) and model.__dict__.get("esc_plan") is not None


def base_export(qmodel):
    """NeMo's ``Exportable.export`` of the original class (skipping :class:`QuantizedASRModel`)."""
    return super(QuantizedASRModel, qmodel).export


__all__ = ["QuantizedASRModel", "quantized_class", "is_quantized_asr_model", "base_export"]
