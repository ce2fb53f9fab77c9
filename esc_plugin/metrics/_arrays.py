"""Input conversion shared by the metric modules (numpy, torch or lists in)."""
import numpy as np


def to_numpy(x, name):
    """Returns ``x`` (numpy array, torch tensor, or nested list) as numpy.

    Arguments
    ---------
    x : array-like
        Values to convert; torch tensors are detached and moved to the CPU.
    name : str
        Argument name used in error messages.

    Returns
    -------
    numpy.ndarray

    Example
    -------
    >>> import torch
    >>> to_numpy(torch.tensor([1.0, 2.0]), "scores")
    array([1., 2.], dtype=float32)
    """
    # Duck-typed so that this module does not need to import torch.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a numpy array, torch tensor or list of numbers "
            f"(got {type(x).__name__}): {err}"
        ) from err


def to_scores(x, name):
    """Returns a non-empty 1-D float64 array of finite values, or raises.

    Arguments
    ---------
    x : array-like
        Scores to convert.
    name : str
        Argument name used in error messages.

    Returns
    -------
    numpy.ndarray

    Example
    -------
    >>> to_scores([0.5, 1], "positive_scores")
    array([0.5, 1. ])
    """
    arr = to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass at least one score")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers, got {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains NaN or inf; remove or fix those scores first"
        )
    return arr
