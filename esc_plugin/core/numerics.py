"""Reference quantization arithmetic (no modelopt needed).

Symmetric, zero point 0, narrow range: ``scale = amax / (2**(b-1) - 1)``.

Example
-------
>>> import torch
>>> fake_quant(torch.tensor([0.5, 2.0]), amax=1.0, num_bits=8).tolist()
[0.5039370059967041, 1.0]
"""
import torch

# Smallest amax we ever hand to a quantizer: a zero scale is an invalid engine.
MIN_AMAX = 1e-8


def fake_quant(x, amax, num_bits):
    """Symmetric fake quantization of ``x`` with a per-tensor (or broadcastable) ``amax``.

    Used by the local search, which needs many candidate scales at once and
    must not mutate the quantizers.
    """
    qmax = 2 ** (num_bits - 1) - 1
    scale = amax / qmax
    q = x / scale
    if q.requires_grad:  # autograd keeps the intermediate values
        return torch.clamp(torch.round(q), -qmax, qmax) * scale
    # The same operations in place: the searches call this for every candidate on
    # large samples, where allocating three more tensors costs more than the arithmetic.
    return q.round_().clamp_(-qmax, qmax).mul_(scale)
