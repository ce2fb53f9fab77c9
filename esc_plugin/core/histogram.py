"""Histogram calibrators: percentile, entropy (TensorRT KL), input-MSE.

These follow pytorch-quantization / modelopt's ``HistogramCalibrator`` maths,
vectorised with numpy. We do not call modelopt's own histogram calibrator:
in modelopt 0.47 its ``mse`` method fails once the histogram range grows
between batches (4097 vs 4096 bins), and its ``entropy`` takes 6–15 s per
quantizer on CPU. The tests check agreement with modelopt where it works.

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
    bin); Q is P merged into ``2**(num_bits-1)`` levels and expanded back.
    Ties go to the largest clip, as in pytorch-quantization.
    """
    bins = np.asarray(hist, dtype=np.float64).copy()
    bins[0] = bins[1]  # the zero bin is dominated by exact zeros (ReLU); ignore its spike
    nlevels = 1 << (num_bits - 1)
    start_bin = min(start_bin, len(bins))
    best, best_i = np.inf, len(bins)
    tail = np.concatenate([np.cumsum(bins[::-1])[::-1], [0.0]])  # tail[i] = sum(bins[i:])
    for i in range(start_bin, len(bins) + 1, stride):
        ref = bins[:i].copy()
        ref[-1] += tail[i]
        digit = np.digitize(np.arange(i), np.linspace(0, i, nlevels + 1)) - 1
        nonzero = bins[:i] > 0
        sums = np.bincount(digit[nonzero], weights=bins[:i][nonzero], minlength=nlevels)
        counts = np.bincount(digit[nonzero], minlength=nlevels)
        q = np.where(nonzero, sums[digit] / np.maximum(counts[digit], 1), 0.0)
        if q.sum() == 0 or ref.sum() == 0:
            continue
        p = ref / ref.sum()
        q = q / q.sum()
        mask = p > 0
        with np.errstate(divide="ignore"):
            kl = np.sum(p[mask] * np.log(p[mask] / q[mask])) if np.all(q[mask] > 0) else np.inf
        if kl <= best:
            best, best_i = kl, i
    return float(edges[min(best_i, len(edges) - 1)])


def histogram_mse(hist, edges, amax, num_bits):
    """MSE of the bin centres quantized with each ``amax`` (a scalar or an array of clips).

    >>> e = np.linspace(0, 1, 5); float(histogram_mse(np.ones(4), e, 1.0, 8)) < 1e-4
    True
    """
    counts = np.asarray(hist, dtype=np.float64)
    centers = (edges[1:] + edges[:-1]) / 2.0
    qmax = 2 ** (num_bits - 1) - 1
    scale = np.maximum(np.atleast_1d(np.asarray(amax, dtype=np.float64)), 1e-12)[:, None] / qmax
    quant = np.clip(np.round(centers[None, :] / scale), -qmax, qmax) * scale
    mse = ((quant - centers[None, :]) ** 2 * counts[None, :]).mean(axis=1)
    return mse if np.ndim(amax) else float(mse[0])


def mse_amax(hist, edges, num_bits, start_bin=128, stride=1):
    """The clip minimising the MSE between bin centres and their quantized values
    (the pytorch-quantization ``mse`` baseline: error of the *input* histogram)."""
    cand = ((edges[1:] + edges[:-1]) / 2.0)[start_bin::stride]
    return float(cand[int(np.argmin(histogram_mse(hist, edges, cand, num_bits)))])
