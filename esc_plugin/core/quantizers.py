"""Quantizer objects: thin layers over modelopt's ``TensorQuantizer``.

Why modelopt: it is NVIDIA's maintained successor of ``pytorch-quantization``;
its ``TensorQuantizer`` holds ``amax`` as a buffer (so it is saved with the
state dict) and exports QuantizeLinear/DequantizeLinear to ONNX, which is what
TensorRT's strongly typed networks consume. We keep its quantizer and write our
own configs, since its presets target LLMs.

Symmetric, zero point 0, narrow range: ``scale = amax / (2**(b-1) - 1)``.
"""
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

from .errors import CalibrationError
from .numerics import MIN_AMAX, fake_quant  # noqa: F401  (fake_quant re-exported)


class ActivationQuantizer(TensorQuantizer):
    """Per-tensor input quantizer with an optional observer.

    ``observer(x)`` is called with the FP32 input before quantization; the
    calibrators use it to collect statistics without modelopt's calibrators.
    """

    def __init__(self, num_bits, name=""):
        super().__init__(QuantizerAttributeConfig(num_bits=num_bits, axis=None, narrow_range=True))
        self.esc_name = name
        self.observer = None
        # Per-channel divisor applied before quantizing (SmoothQuant); its axis is the op's
        # input-channel axis. A buffer, so it follows .to(device) and the state dict.
        self.register_buffer("pre_scale", None)
        self.pre_scale_axis = -1
        # Per-channel constant added after the pre-scale, before quantizing (NoisyQuant's noisy bias;
        # the layer removes it through its bias). Same axis as the pre-scale: the op's input channels.
        self.register_buffer("noise", None)
        # Population batching (core/batching.py): while k candidates share a tiled batch, their k amax
        # values, the tiled batch size k·B of the current call, and where the candidates' rows lie:
        # "batch_first" (k blocks along dim 0) or "time_major" ((T, k·B, ...) or (T·k·B, ...), as in
        # torch's multi_head_attention_forward).
        self.candidate_amax, self.candidate_rows, self.candidate_layout = None, None, "batch_first"

    def set_candidate_amax(self, values):
        """Quantize the k candidates' rows with k amax values (None: back to one amax).

        The arithmetic is modelopt's, with the amax broadcast per block of rows.
        """
        self.candidate_amax = None if values is None else \
            torch.as_tensor(values, dtype=torch.float32).clamp_min(MIN_AMAX).reshape(-1)

    def _quantize_per_candidate(self, inputs):
        k, rows = self.candidate_amax.numel(), self.candidate_rows
        x = inputs.contiguous()
        # A module applied time-major inside a batch-first model (SpeechBrain's feed-forward permutes to
        # (T, B, D)) shows the tiled batch in dim 1 and not in dim 0: its rows are found there too.
        time_major = self.candidate_layout == "time_major" or (
            rows and x.dim() >= 2 and x.shape[0] != rows and x.shape[1] == rows)
        if time_major and rows and x.dim() >= 2 and x.shape[1] == rows:
            blocks, shape = x.reshape(x.shape[0], k, -1), (1, k, 1)
        elif self.candidate_layout == "time_major" and rows and x.dim() == 2 and x.shape[0] % rows == 0:
            blocks, shape = x.reshape(-1, k, rows // k * x.shape[1]), (1, k, 1)  # (T·k·B, D) -> (T, k, B·D)
        elif self.candidate_layout == "batch_first" and x.dim() and x.shape[0] % k == 0:
            blocks, shape = x.reshape(k, -1), (k, 1)
        else:
            from .batching import BatchingError

            shared = " (one row for the whole batch: an input such as positional embeddings, which k candidates' " \
                     "scales cannot act on in one forward)" if x.dim() and x.shape[0] == 1 else ""
            raise BatchingError(
                f"batch_candidates={k}: the input of '{self.esc_name}' has shape {tuple(inputs.shape)}, which does not "
                f"hold {k} candidates' rows ({self.candidate_layout.replace('_', '-')}, {rows} tiled rows){shared}: "
                "population batching needs batch-first (or time-major) activations at every quantized op. Use "
                "batch_candidates=1 for this model, or exclude that op from quantization.")
        amax = self.candidate_amax.to(inputs.device).reshape(shape)
        out = fake_tensor_quant(blocks, amax, None, self._num_bits, self._unsigned, self._narrow_range)
        return out.reshape(inputs.shape)

    def set_pre_scale(self, scale, axis):
        """Divide the input by ``scale`` along ``axis`` before quantizing (None removes it)."""
        self.pre_scale_axis = axis
        self.pre_scale = None if scale is None else scale.detach().float().clone()

    def set_noise(self, noise, axis):
        """Add ``noise`` along ``axis`` (after any pre-scale) before quantizing (None removes it)."""
        self.pre_scale_axis = axis
        self.noise = None if noise is None else noise.detach().float().clone()

    def apply_pre_scale(self, inputs):
        """The input as this quantizer quantizes it (divided by the pre-scale, plus the noise, if any)."""
        if self.pre_scale is None and self.noise is None:
            return inputs
        shape = [1] * inputs.dim()
        shape[self.pre_scale_axis] = -1
        if self.pre_scale is not None:
            inputs = inputs / self.pre_scale.to(inputs.dtype).view(shape)
        if self.noise is not None:
            inputs = inputs + self.noise.to(inputs.dtype).view(shape)
        return inputs

    def forward(self, inputs):
        inputs = self.apply_pre_scale(inputs)
        if self.observer is not None:
            self.observer(inputs)
        if getattr(self, "candidate_amax", None) is not None and self.is_enabled and inputs.numel():
            return self._quantize_per_candidate(inputs)
        if self.is_enabled and getattr(self, "_amax", None) is None and not self._if_calib:
            raise CalibrationError(
                f"activation quantizer '{self.esc_name}' has no amax: the calibration "
                "forward_loop never reached this op. Make forward_loop exercise every "
                "code path used at inference (e.g. the decoder as well as the encoder)."
            )
        return super().forward(inputs)

    def set_amax(self, value):
        value = float(value)
        if not torch.isfinite(torch.tensor(value)):
            raise CalibrationError(f"amax for '{self.esc_name}' is {value}: it must be finite.")
        self.amax = torch.tensor(max(value, MIN_AMAX), dtype=torch.float32)


def weight_quantizer(num_bits):
    """Per-output-channel (axis 0) Max quantizer for a weight tensor."""
    return TensorQuantizer(QuantizerAttributeConfig(num_bits=num_bits, axis=0, narrow_range=True))


def calibrate_weight(quantizer, weight):
    """Per-channel Max: amax of each output channel, never zero."""
    dims = tuple(range(1, weight.dim()))
    amax = weight.detach().abs().amax(dim=dims, keepdim=True).float().clamp_min(MIN_AMAX)
    quantizer.amax = amax
