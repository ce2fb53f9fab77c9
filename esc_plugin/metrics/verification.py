"""Speaker-verification error measures: EER and minDCF.

Both follow SpeechBrain's ``speechbrain.utils.metric_stats.EER``/``minDCF``:
the candidate thresholds are the unique scores plus the midpoints between
neighbours, a trial is accepted when ``score > threshold``, and on ties the
lowest threshold wins. Counting with ``searchsorted`` gives the same numbers
in O(n log n) instead of SpeechBrain's O(n^2) loop/broadcast.
"""
import numpy as np

from ._arrays import to_scores


def _rates(positive_scores, negative_scores):
    """Thresholds and the miss / false-alarm rates at each of them."""
    pos = np.sort(to_scores(positive_scores, "positive_scores"))
    neg = np.sort(to_scores(negative_scores, "negative_scores"))
    unique = np.unique(np.concatenate([pos, neg]))
    thresholds = np.sort(np.concatenate([unique, (unique[:-1] + unique[1:]) / 2]))
    n_miss = np.searchsorted(pos, thresholds, side="right")  # pos <= t
    n_fa = neg.size - np.searchsorted(neg, thresholds, side="right")  # neg > t
    return thresholds, n_miss, n_fa, pos.size, neg.size


def equal_error_rate(positive_scores, negative_scores):
    """Equal error rate: where miss and false-alarm rates cross.

    Arguments
    ---------
    positive_scores : array-like
        1-D scores of target (same-speaker) trials; higher means "same".
    negative_scores : array-like
        1-D scores of non-target trials.

    Returns
    -------
    eer : float
        ``(miss rate + false-alarm rate) / 2`` at the threshold where the two
        are closest (they are rarely exactly equal on finite data).
    threshold : float
        That threshold; trials with ``score > threshold`` are accepted.

    Example
    -------
    >>> eer, threshold = equal_error_rate([0.6, 0.7, 0.8, 0.3], [0.4, 0.2, 0.1, 0.5])
    >>> eer, threshold
    (0.25, 0.4)
    """
    thresholds, n_miss, n_fa, n_pos, n_neg = _rates(positive_scores, negative_scores)
    # |n_fa/N - n_miss/P| scaled by N*P: integers, so ties are exact and
    # argmin's first-index rule reproduces the reference tie-breaking.
    gap = np.abs(n_fa * n_pos - n_miss * n_neg)
    k = int(np.argmin(gap))
    eer = (n_fa[k] / n_neg + n_miss[k] / n_pos) / 2
    return float(eer), float(thresholds[k])


def min_dcf(
    positive_scores,
    negative_scores,
    p_target=0.01,
    c_miss=1.0,
    c_fa=1.0,
    normalize=True,
):
    """Minimum of the detection cost function over all thresholds.

    ``C_det = c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)``.
    With ``normalize=True`` (NIST SRE convention) it is divided by
    ``min(c_miss * p_target, c_fa * (1 - p_target))``, the cost of always
    accepting or always rejecting, so 1.0 means "no better than a constant
    decision". SpeechBrain's ``minDCF`` returns the unnormalized value,
    which ``normalize=False`` reproduces.

    Arguments
    ---------
    positive_scores : array-like
        1-D scores of target trials; higher means "same".
    negative_scores : array-like
        1-D scores of non-target trials.
    p_target : float
        Prior probability of a target trial, in (0, 1).
    c_miss : float
        Cost of a missed target (positive).
    c_fa : float
        Cost of a false alarm (positive).
    normalize : bool
        Divide by the cost of the best constant decision (see above).

    Returns
    -------
    min_dcf : float
        The minimum detection cost.
    threshold : float
        The threshold that reaches it; ``score > threshold`` is accepted.

    Example
    -------
    >>> pos, neg = [0.6, 0.7, 0.8, 0.3], [0.4, 0.2, 0.1, 0.5]
    >>> min_dcf(pos, neg, p_target=0.5)
    (0.25, 0.5)
    >>> min_dcf(pos, neg, p_target=0.5, normalize=False)
    (0.125, 0.5)
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if not (c_miss > 0 and c_fa > 0):
        raise ValueError(f"c_miss and c_fa must be positive, got {c_miss}, {c_fa}")
    thresholds, n_miss, n_fa, n_pos, n_neg = _rates(positive_scores, negative_scores)
    c_det = c_miss * p_target * (n_miss / n_pos) + c_fa * (1 - p_target) * (
        n_fa / n_neg
    )
    k = int(np.argmin(c_det))
    cost = c_det[k]
    if normalize:
        cost = cost / min(c_miss * p_target, c_fa * (1 - p_target))
    return float(cost), float(thresholds[k])
