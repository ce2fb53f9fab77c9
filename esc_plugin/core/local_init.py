"""ESC step 1: per-layer scale by grid search on the layer *output* error (Eq. 4).

For op ``l`` with FP32 input sample ``x``, choose ``s`` minimising
``|| l(x) - l_q(Q_s(x)) ||²`` where ``l_q`` uses the quantized weight. Unlike
the input-histogram MSE baseline, this sees how the clipping error propagates
through the weights, which is what matters for speech activations whose range
is dominated by a few huge values.
"""
import numpy as np
import torch

from .quantizers import MIN_AMAX, fake_quant


def _output_error(point, inputs, refs, amax, num_bits):
    err = 0.0
    for x, ref in zip(inputs, refs):
        err += float(((point.output(fake_quant(x, amax, num_bits), True) - ref) ** 2).sum())
    return err


@torch.no_grad()
def search_layer_amax(point, inputs, max_abs, num_bits, grid=32, min_ratio=1e-3):
    """Coarse log-spaced grid over ``[min_ratio, 1] * max_abs``, then a finer
    grid between the neighbours of the best coarse point.

    Returns ``(amax, curve)`` where ``curve`` is a list of (amax, error) pairs.
    """
    if max_abs <= 0 or not inputs:
        return max(max_abs, MIN_AMAX), []
    refs = [point.output(x, False) for x in inputs]
    coarse = max_abs * np.geomspace(min_ratio, 1.0, grid)
    curve = [(float(a), _output_error(point, inputs, refs, float(a), num_bits)) for a in coarse]
    best = int(np.argmin([e for _, e in curve]))
    lo, hi = coarse[max(best - 1, 0)], coarse[min(best + 1, grid - 1)]
    for a in np.geomspace(lo, hi, max(grid // 4, 4) + 2)[1:-1]:  # refine around the best
        curve.append((float(a), _output_error(point, inputs, refs, float(a), num_bits)))
    curve.sort()
    amax = min(curve, key=lambda ae: ae[1])[0]
    return max(amax, MIN_AMAX), curve
