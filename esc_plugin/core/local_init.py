"""ESC step 1: per-layer scale by grid search on the layer *output* error (Eq. 4).

For op ``l`` with FP32 input sample ``x``, choose ``s`` minimising
``|| l(x) - l_q(Q_s(x)) ||²`` where ``l_q`` uses the quantized weight. Unlike
the input-histogram MSE baseline, this sees how the clipping error propagates
through the weights, which is what matters for speech activations whose range
is dominated by a few huge values.
"""
import numpy as np
import torch
from tqdm.auto import tqdm

from .numerics import MIN_AMAX, fake_quant


def _output_error(point, inputs, refs, amax, num_bits):
    err = 0.0
    for x, ref in zip(inputs, refs):
        # quantize in float32 (half models: same grid as the deployed int8), apply in the op's dtype
        xq = fake_quant(x.float(), amax, num_bits).to(x.dtype)
        # in place: the output is a fresh tensor (or xq itself, for weightless sites), never ref
        err += float(point.output(xq, True).float().sub_(ref).square_().sum())
    return err if np.isfinite(err) else np.inf


def _module_dtype(point):
    for p in point.module.parameters(recurse=False):
        return p.dtype
    return torch.float32


def local_init(ctx):
    """ESC step 1 for every active site of a :class:`CalibrationContext`: an amax array."""
    init = np.empty(len(ctx.sites))
    bar = tqdm(list(zip(ctx.sites, ctx.maxes)), desc="ESC local init (output MSE)", disable=not ctx.progress)
    for i, (site, m) in enumerate(bar):
        init[i], _ = search_layer_amax(site, ctx.samples(site), float(m), ctx.config.act_bits,
                                       ctx.config.init_grid)
    return init


@torch.no_grad()
def search_layer_amax(point, inputs, max_abs, num_bits, grid=32, min_ratio=1e-3):
    """Coarse log-spaced grid over ``[min_ratio, 1] * max_abs``, then a finer
    grid between the neighbours of the best coarse point.

    Returns ``(amax, curve)`` where ``curve`` is a list of (amax, error) pairs.
    """
    if not max_abs > 0 or not inputs:
        return max(max_abs, MIN_AMAX) if np.isfinite(max_abs) else MIN_AMAX, []
    dtype = _module_dtype(point)
    inputs = [x.to(dtype) for x in inputs]
    refs = [point.output(x, False).float() for x in inputs]
    coarse = max_abs * np.geomspace(min_ratio, 1.0, grid)
    curve = [(float(a), _output_error(point, inputs, refs, float(a), num_bits)) for a in coarse]
    errors = np.array([e for _, e in curve])
    if not np.isfinite(errors).any():  # nothing measurable: never collapse to the grid floor
        return max_abs, curve
    best = int(np.argmin(errors))
    lo, hi = coarse[max(best - 1, 0)], coarse[min(best + 1, grid - 1)]
    for a in np.geomspace(lo, hi, max(grid // 4, 4) + 2)[1:-1]:  # refine around the best
        curve.append((float(a), _output_error(point, inputs, refs, float(a), num_bits)))
    curve.sort()
    amax = min(curve, key=lambda ae: ae[1] if np.isfinite(ae[1]) else np.inf)[0]
    return max(amax, MIN_AMAX), curve
