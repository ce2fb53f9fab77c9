"""Whisper tiny.en model and features: loading from the shared folder, device, log-mel.

The model is Hugging Face ``WhisperForConditionalGeneration`` (FP32, eval
mode); the features are ``WhisperFeatureExtractor`` log-mels (80 bands, every
clip padded to 30 s), computed once per task build.
"""
from typing import Sequence

import torch
import torch.nn as nn

from esc_plugin.core.errors import ConfigError
from esc_plugin.tasks.audio import require_path, resolve_shared_root

from .data import SAMPLE_RATE


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device; a clear error when CUDA is asked for
    but not available."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but torch {torch.__version__} sees no CUDA device: "
                          "use device='cpu' or a CUDA build of torch on a GPU machine.")
    return dev


def load_whisper(shared_root=None, device="cpu"):
    """Return ``(model, feature_extractor, tokenizer)`` for whisper-tiny.en
    (FP32, eval mode, on ``device``) from the shared folder."""
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    mdir = require_path(resolve_shared_root(shared_root) / "models" / "whisper-tiny.en",
                        "Whisper tiny.en model folder")
    model = WhisperForConditionalGeneration.from_pretrained(str(mdir), dtype=torch.float32).eval()
    model.to(resolve_device(device))
    fe = WhisperFeatureExtractor.from_pretrained(str(mdir))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(require_path(mdir / "tokenizer.json", "tokenizer.json")))
    return model, fe, tok


def log_mel(fe, wavs: Sequence[torch.Tensor], device=None) -> torch.Tensor:
    """(N, 80, 3000) Whisper log-mel features of 16 kHz waveforms; computed
    (STFT included) and returned on ``device`` when given, else on the CPU."""
    kwargs = {} if device is None else {"device": str(device)}
    feats = fe([w.numpy() for w in wavs], sampling_rate=SAMPLE_RATE, return_tensors="pt",
               **kwargs).input_features.float()
    return feats if device is None else feats.to(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
