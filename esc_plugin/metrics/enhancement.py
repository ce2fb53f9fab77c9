"""Speech-enhancement quality measures: PESQ and STOI (higher is better).

``pesq`` and ``pystoi`` are imported on first use so that the rest of
``esc_plugin.metrics`` works without them.
"""
import warnings

import numpy as np

from ._arrays import to_numpy


def _signal(x, name):
    arr = to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D waveform, got shape {arr.shape}; "
            "squeeze the channel dimension or pass one item of the batch"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf samples")
    return arr


def _pair(reference, degraded):
    ref, deg = _signal(reference, "reference"), _signal(degraded, "degraded")
    if ref.size != deg.size:
        raise ValueError(
            f"reference has {ref.size} samples but degraded has {deg.size}; "
            "trim or pad them to the same length (and check they are aligned)"
        )
    return ref, deg


def pesq_score(reference, degraded, sample_rate=16000):
    """PESQ (ITU-T P.862) of ``degraded`` against ``reference``.

    Wideband (P.862.2) at 16 kHz, narrowband at 8 kHz, as the ``pesq``
    package supports only those rates.

    Arguments
    ---------
    reference : array-like
        Clean 1-D waveform (numpy array or torch tensor).
    degraded : array-like
        Processed 1-D waveform, same length and alignment.
    sample_rate : int
        16000 or 8000.

    Returns
    -------
    float
        MOS-LQO, roughly 1.0 (bad) to 4.64 (identical, wideband).

    Example
    -------
    >>> import numpy as np
    >>> t = np.arange(3 * 16000) / 16000
    >>> x = np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    >>> round(pesq_score(x, x), 2)
    4.64
    """
    modes = {16000: "wb", 8000: "nb"}
    if sample_rate not in modes:
        raise ValueError(
            f"PESQ needs 16000 Hz (wideband) or 8000 Hz (narrowband) audio, "
            f"got sample_rate={sample_rate}; resample first"
        )
    ref, deg = _pair(reference, degraded)
    try:
        from pesq import PesqError, pesq
    except ImportError as err:
        raise ImportError("pesq_score needs the `pesq` package") from err
    # An all-zero signal makes pesq crash with an unrelated NaN error
    # instead of its own "no utterances" one; catch it here instead.
    for name, arr in (("reference", ref), ("degraded", deg)):
        if not np.any(arr):
            raise ValueError(f"PESQ is undefined: {name} is all zeros (silent)")
    try:
        return float(pesq(sample_rate, ref, deg, modes[sample_rate]))
    except PesqError as err:
        reason = err.args[0] if err.args else err
        if isinstance(reason, bytes):  # the C extension reports bytes
            reason = reason.decode(errors="replace")
        raise ValueError(
            f"PESQ failed ({reason}): the signals are probably silent, too "
            "quiet or too short (PESQ needs at least 0.25 s, with speech)"
        ) from err


def stoi_score(reference, degraded, sample_rate, extended=False):
    """STOI (short-time objective intelligibility) via ``pystoi``.

    Arguments
    ---------
    reference : array-like
        Clean 1-D waveform (numpy array or torch tensor).
    degraded : array-like
        Processed 1-D waveform, same length and alignment.
    sample_rate : int
        Sample rate in Hz; pystoi resamples to 10 kHz internally.
    extended : bool
        Compute extended STOI (ESTOI) instead.

    Returns
    -------
    float
        Intelligibility in about [0, 1]; 1 for identical signals.

    Example
    -------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal(16000)
    >>> round(stoi_score(x, x, 16000), 4)
    1.0
    """
    is_int = isinstance(sample_rate, (int, np.integer)) and not isinstance(
        sample_rate, bool
    )
    if not is_int or sample_rate <= 0:
        raise ValueError(
            f"sample_rate must be a positive int in Hz, got {sample_rate!r}"
        )
    ref, deg = _pair(reference, degraded)
    if not np.any(ref):
        # pystoi would return 0.0 here, as if the output were unintelligible.
        raise ValueError("STOI is undefined: reference is all zeros (silent)")
    try:
        from pystoi import stoi
    except ImportError as err:
        raise ImportError("stoi_score needs the `pystoi` package") from err
    # pystoi only warns and returns 1e-5 when too few non-silent frames are
    # left; that number would silently drag a mean down, so raise instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = stoi(ref, deg, sample_rate, extended=extended)
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        raise ValueError(
            "STOI is undefined: the reference is silent or too short "
            "(needs about 0.4 s of non-silent audio)"
        )
    return float(score)


def _batch_mean(score_fn, refs, degs, sample_rate, lengths):
    if len(refs) == 0:
        raise ValueError("refs is empty; pass at least one waveform")
    if len(refs) != len(degs):
        raise ValueError(f"got {len(refs)} refs but {len(degs)} degraded signals")
    if lengths is not None:
        lengths = to_numpy(lengths, "lengths").reshape(-1)
        if len(lengths) != len(refs):
            raise ValueError(f"got {len(lengths)} lengths for {len(refs)} signals")
        if not np.all(lengths == np.round(lengths)) or np.any(lengths < 1):
            raise ValueError(
                "lengths must be absolute sample counts (positive ints), not "
                "relative lengths; multiply relative lengths by the time dim"
            )
    scores = []
    for k in range(len(refs)):
        ref, deg = refs[k], degs[k]
        if lengths is not None:  # drop the zero padding of a batch
            ref, deg = ref[: int(lengths[k])], deg[: int(lengths[k])]
        try:
            scores.append(score_fn(ref, deg, sample_rate))
        except ValueError as err:
            raise ValueError(f"item {k}: {err}") from err
    return float(np.mean(scores))


def mean_pesq(refs, degs, sample_rate=16000, lengths=None):
    """Mean :func:`pesq_score` over a batch.

    Arguments
    ---------
    refs : sequence of array-like
        Clean waveforms: a list of 1-D arrays/tensors or a (batch, time) array.
    degs : sequence of array-like
        Processed waveforms, paired with ``refs``.
    sample_rate : int
        16000 or 8000.
    lengths : array-like, optional
        Valid samples per item (absolute ints), to ignore batch padding.

    Returns
    -------
    float

    Example
    -------
    >>> import numpy as np
    >>> t = np.arange(3 * 16000) / 16000
    >>> x = np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    >>> round(mean_pesq([x, x], [x, x]), 2)
    4.64
    """
    return _batch_mean(pesq_score, refs, degs, sample_rate, lengths)


def mean_stoi(refs, degs, sample_rate, lengths=None):
    """Mean :func:`stoi_score` over a batch.

    Arguments
    ---------
    refs : sequence of array-like
        Clean waveforms: a list of 1-D arrays/tensors or a (batch, time) array.
    degs : sequence of array-like
        Processed waveforms, paired with ``refs``.
    sample_rate : int
        Sample rate in Hz.
    lengths : array-like, optional
        Valid samples per item (absolute ints), to ignore batch padding.

    Returns
    -------
    float

    Example
    -------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 16000))
    >>> round(mean_stoi(x, x, 16000), 4)
    1.0
    """
    return _batch_mean(stoi_score, refs, degs, sample_rate, lengths)
