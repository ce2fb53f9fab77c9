"""Shared helpers for the task builders: locating the shared data folder,
loading / resampling / padding audio. (Text normalisation and WER come from
``esc_plugin.metrics.text``.)

The real data and weights live outside the repository (see the shared
``README.md``); nothing here copies them, every function takes paths.
"""
import os
from pathlib import Path
from typing import Optional, Union

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
