"""Spectrogram-level error for acoustic models (e.g. TTS mel predictors)."""
import math

import torch


def mel_l1(pred, target, lengths=None):
    """Mean absolute error between mel spectrograms over the valid frames.

    Arguments
    ---------
    pred : torch.Tensor or numpy.ndarray
        Predicted spectrograms, ``(batch, time, n_mels)``.
    target : torch.Tensor or numpy.ndarray
        Reference spectrograms, same shape.
    lengths : array-like of int, optional
        Valid frames per item (absolute counts, not SpeechBrain's relative
        lengths). Frames past them are padding and are ignored. ``None``
        means every frame is valid.

    Returns
    -------
    float
        Mean of ``|pred - target|`` over valid frames and all mel bins.

    Example
    -------
    >>> pred = torch.zeros(2, 4, 3)
    >>> target = torch.ones(2, 4, 3)
    >>> target[1, 2:] = 100.0  # padding of the second item
    >>> mel_l1(pred, target, lengths=[4, 2])
    1.0
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            "pred and target must both be (batch, time, n_mels) with the same "
            f"shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"empty spectrograms of shape {tuple(pred.shape)}")
    # float64 so long evaluations do not lose precision in the sum.
    err = (pred.double() - target.double()).abs()
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=pred.device)
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(
                "lengths must be integer frame counts; if you have relative "
                "lengths in [0, 1], use (rel * time).round().long()"
            )
        batch, time = pred.shape[:2]
        if lengths.shape != (batch,):
            raise ValueError(
                f"lengths must have shape ({batch},), got {tuple(lengths.shape)}"
            )
        if lengths.min() < 0 or lengths.max() > time:
            raise ValueError(
                f"lengths must lie in [0, {time}] frames, got {lengths.tolist()}"
            )
        if lengths.sum() == 0:
            raise ValueError("all lengths are 0; there are no valid frames to compare")
        # Indexing (not multiplying by a mask) keeps NaN/inf padding out.
        valid = torch.arange(time, device=pred.device)[None, :] < lengths[:, None]
        err = err[valid]
    value = err.mean().item()
    if not math.isfinite(value):
        raise ValueError("pred or target has NaN/inf in the valid frames")
    return value
