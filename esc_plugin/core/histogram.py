"""Histogram calibrators: percentile, entropy (TensorRT KL), input-MSE.

These follow pytorch-quantization / modelopt's ``HistogramCalibrator`` maths,
vectorised with numpy. We do not call modelopt's own histogram calibrator:
in modelopt 0.47 its ``mse`` method fails once the histogram range grows
between batches (4097 vs 4096 bins), and its ``entropy`` loops over every
clip in Python, seconds per quantizer on CPU. The tests check agreement with
modelopt where it works.

Histograms are of ``|x|`` over ``[0, max|x|]`` (symmetric quantization).
"""
import numpy as np


def percentile_amax(hist, edges, percentile):
    """Smallest bin edge below which ``percentile`` % of |x| lies.

    Example
    -------
    >>> hist = np.ones(100); edges = np.linspace(0, 1, 101)
    >>> round(float(percentile_amax(hist, edges, 50.0)), 2)
    0.49
    """
    cdf = np.cumsum(hist, dtype=np.float64)
    cdf /= cdf[-1]
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(idx, len(edges) - 1)])


def entropy_amax(hist, edges, num_bits, start_bin=128, stride=1):
    """TensorRT's entropy calibration: the clip that minimises KL(P || Q).

    P is the histogram clipped at bin ``i`` (outliers folded into the last
    bin); Q is P merged into ``2**(num_bits-1)`` levels and expanded back
    (each non-empty bin of a level gets the level's mean). Ties go to the
    largest clip, as in pytorch-quantization.

    Every clip is scored at once, per level rather than per bin: within a
    level Q is one value, so ``sum_j P_j log Q_j`` is the level's P mass times
    one log, and ``sum_j P_j log P_j`` is a prefix sum. That is the same KL as
    the per-clip loop of pytorch-quantization (``tests/test_core.py`` checks
    the chosen clip against that loop) without its cost per bin and clip,
    which dominated ESC's start on models with many quantized inputs.

    Example
    -------
    >>> import numpy as np
    >>> x = np.abs(np.random.default_rng(0).standard_t(3, 100000))
    >>> hist, edges = np.histogram(x, bins=2048, range=(0, x.max()))
    >>> bool(0 < entropy_amax(hist, edges, 8) < x.max())
    True
    """
    bins = np.asarray(hist, dtype=np.float64).copy()
    bins[0] = bins[1]  # the zero bin is dominated by exact zeros (ReLU); ignore its spike
    n, nlevels = len(bins), 1 << (num_bits - 1)
    clips = np.arange(min(start_bin, n), n + 1, stride)
    total = float(bins.sum())
    if total == 0 or len(clips) == 0:
        return float(edges[min(n, len(edges) - 1)])
    nonempty = bins > 0
    p = bins / total
    zero = np.zeros(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cum_plogp = np.concatenate([zero, np.cumsum(np.where(nonempty, p * np.log(p), 0.0))])
    cum_p = np.concatenate([zero, np.cumsum(np.where(nonempty, p, 0.0))])
    cum_bins = np.concatenate([zero, np.cumsum(bins)])  # counts are integers: these sums are exact
    cum_nonempty = np.concatenate([[0], np.cumsum(nonempty)])
    tail = np.concatenate([np.cumsum(bins[::-1])[::-1], zero])  # tail[i] = sum(bins[i:])

    # level k of clip i: the bins j with edges[k] <= j < edges[k + 1], edges = linspace(0, i, nlevels + 1)
    bounds = np.ceil(np.linspace(0, clips, nlevels + 1, axis=1)).astype(np.int64)
    bounds[:, -1] = clips
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    counts = cum_nonempty[hi] - cum_nonempty[lo]
    level_q = (cum_bins[hi] - cum_bins[lo]) / np.maximum(counts, 1)  # Q of each non-empty bin, unnormalised
    q_total = (level_q * counts).sum(axis=1)
    level_p = cum_p[hi] - cum_p[lo]
    last = clips - 1
    p_last = (bins[last] + tail[clips]) / total  # the clip bin holds the outliers folded into it
    level_p[:, -1] += p_last - np.where(nonempty[last], p[last], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(counts > 0, level_p * np.log(level_q / q_total[:, None]), 0.0).sum(axis=1)
        kl = cum_plogp[last] + np.where(p_last > 0, p_last * np.log(p_last), 0.0) - cross
    kl[(p_last > 0) & ~nonempty[last]] = np.inf  # outliers folded into an empty bin, where Q is 0
    scored = q_total > 0
    if not scored.any():
        return float(edges[min(n, len(edges) - 1)])
    kl, clips = kl[scored], clips[scored]
    # ties to rounding (exact ties of the per-clip loop come out a few ulps apart here): the largest clip
    best = int(clips[np.flatnonzero(kl <= kl.min() + 1e-12)[-1]])
    return float(edges[min(best, len(edges) - 1)])


def histogram_mse(hist, edges, amax, num_bits):
    """MSE of the bin centres quantized with each ``amax`` (a scalar or an array of clips).

    >>> e = np.linspace(0, 1, 5); float(histogram_mse(np.ones(4), e, 1.0, 8)) < 1e-4
    True
    """
    counts = np.asarray(hist, dtype=np.float64)
    centers = (edges[1:] + edges[:-1]) / 2.0
    n, seen = len(counts), counts > 0  # empty bins add nothing: leave them out of the (clips x bins) grid
    counts, centers = counts[seen], centers[seen]
    qmax = 2 ** (num_bits - 1) - 1
    scale = np.maximum(np.atleast_1d(np.asarray(amax, dtype=np.float64)), 1e-12)[:, None] / qmax
    quant = np.clip(np.round(centers[None, :] / scale), -qmax, qmax) * scale
    mse = ((quant - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1) / n
    return mse if np.ndim(amax) else float(mse[0])


def mse_amax(hist, edges, num_bits, start_bin=128, stride=1):
    """The clip minimising the MSE between bin centres and their quantized values
    (the pytorch-quantization ``mse`` baseline: error of the *input* histogram)."""
    cand = ((edges[1:] + edges[:-1]) / 2.0)[start_bin::stride]
    return float(cand[int(np.argmin(histogram_mse(hist, edges, cand, num_bits)))])
