"""Shared helpers for the task builders: locating the shared data folder,
loading / resampling / padding audio, and a text normaliser + WER fallback.

The real data and weights live outside the repository (see the shared
``README.md``); nothing here copies them, every function takes paths.
"""
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

#: Environment variable that points at the shared data/weights folder.
SHARED_ENV = "ESC_SHARED"

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_shared_root() -> Path:
    """``$ESC_SHARED`` if set, else ``<repo root>/../shared``."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env)
    return _REPO_ROOT.parent / "shared"


def resolve_shared_root(shared_root: Optional[Union[str, Path]] = None) -> Path:
    """Return the shared folder as a Path, or raise a clear FileNotFoundError.

    Arguments
    ---------
    shared_root : str or Path, optional
        Explicit location. ``None`` means :func:`default_shared_root`.
    """
    root = Path(shared_root) if shared_root is not None else default_shared_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"shared data folder not found at '{root}'. Pass shared_root=... or set "
            f"the {SHARED_ENV} environment variable to the folder that holds "
            "data/ and models/ (default: <repo root>/../shared)."
        )
    return root


def require_path(path: Path, what: str) -> Path:
    """Raise a FileNotFoundError that names the env var if ``path`` is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at '{path}'. Check the shared folder "
            f"(pass shared_root=... or set {SHARED_ENV})."
        )
    return path


def load_audio(path: Union[str, Path], sample_rate: Optional[int] = None) -> torch.Tensor:
    """Load an audio file as a mono float32 tensor of shape (samples,).

    Multi-channel files are averaged to mono. If ``sample_rate`` is given and
    differs from the file's rate, the signal is resampled with
    ``torchaudio.functional.resample``.
    """
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sample_rate is not None and sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav


def pad_or_trim(wav: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad at the end or trim a (..., samples) tensor to ``length`` samples."""
    n = wav.shape[-1]
    if n >= length:
        return wav[..., :length]
    return torch.nn.functional.pad(wav, (0, length - n))


# --------------------------------------------------------------------------
# Text normalisation and WER.
# TODO: switch to esc_plugin.metrics.text (normalize_text, word_error_rate)
# once it lands; until then the whisper task uses it when importable and
# falls back to these private helpers otherwise.
# --------------------------------------------------------------------------
_PUNCT = re.compile(r"[^\w\s']|_")


def _normalize_text(text: str) -> str:
    """Lowercase, turn punctuation into spaces (apostrophes are dropped so
    "don't" -> "dont"), collapse whitespace."""
    text = text.lower().replace("'", "")
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _word_error_rate(refs: List[str], hyps: List[str]) -> float:
    """Corpus WER (fraction): total word edits / total reference words,
    after :func:`_normalize_text` on both sides."""
    if len(refs) != len(hyps):
        raise ValueError("refs and hyps must have the same length")
    errors = words = 0
    for r, h in zip(refs, hyps):
        rw, hw = _normalize_text(r).split(), _normalize_text(h).split()
        errors += _edit_distance(rw, hw)
        words += len(rw)
    return errors / max(words, 1)


def get_text_metrics():
    """Return ``(normalize_text, word_error_rate)``.

    Prefers ``esc_plugin.metrics.text`` when it exists; falls back to the
    private helpers above. Either way ``word_error_rate(refs, hyps)`` returns
    a fraction.
    """
    try:  # pragma: no cover - depends on the rest of the repo
        from esc_plugin.metrics.text import normalize_text, word_error_rate

        return normalize_text, word_error_rate
    except ImportError:
        return _normalize_text, _word_error_rate
