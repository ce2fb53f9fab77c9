"""Quantization state files: versioned, code-free, bound to the FP32 weights.

``esc_plugin.quantized/2`` holds, per site, the activation amax, the weight
amax and any pre-quantization scale (SmoothQuant), the PTQ passes' states in
the order they ran, and a SHA-256 digest of the FP32 model's state dict (all
parameters and buffers, bytes and shapes). Files are read with
``torch.load(weights_only=True)``: only tensors, numbers, strings and
containers, so reading a file never runs code from it. ``/1`` files (amax
only) are still read.
"""
import hashlib
import os
import pickle
import zipfile

import torch

from .errors import ConfigError

FORMAT = "esc_plugin.quantized/2"
READABLE_FORMATS = ("esc_plugin.quantized/1", FORMAT)


def state_digest(model):
    """SHA-256 over every parameter and buffer of ``model`` (name, dtype, shape, bytes).

    Example
    -------
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> d = state_digest(m)
    >>> with torch.no_grad():
    ...     _ = m.weight.neg_()
    >>> d == state_digest(m)
    False
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=False).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_file(path, what, missing_ok=False):
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if missing_ok:
            return None
        raise ConfigError(f"{what} {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path} is not a {what} written by esc_plugin (it holds objects other than "
                          f"tensors, numbers and strings, which are never loaded: {exc}).") from exc
    except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ConfigError(f"{what} {path} is truncated or corrupt ({type(exc).__name__}: {exc}): "
                          "write it again (rerun the quantization).") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a {what} written by esc_plugin.")
    return state


def weights_sum_fingerprint(plan):
    """The ``/1`` files' weak check (sum of |w| of the quantized ops); only for reading them."""
    total = 0.0
    for p in plan.points:
        for _, w in p.module.named_parameters(recurse=False):
            total += float(w.detach().double().abs().sum())
    return total


def site_state(plan):
    """Per-site activation amax (None = left in float), weight amax and pre-quantization scale."""
    sites = {}
    for p in plan.points:
        q = p.input_quantizer
        entry = {"amax": float(q.amax) if q.is_enabled and q.amax is not None else None}
        pre = getattr(q, "pre_scale", None)
        if pre is not None:
            entry["pre_scale"] = pre.detach().cpu().clone()
        sites[p.name] = entry
    weights = {}
    for name, module in plan.weight_owners():
        for attr, wq in module_weight_quantizers(module):
            if wq.amax is not None:
                weights[f"{name}:{attr}"] = wq.amax.detach().cpu().clone()
    return sites, weights


def module_weight_quantizers(module):
    """``(attr, quantizer)`` pairs of one module's weight quantizers."""
    out = []
    if getattr(module, "weight_quantizer", None) is not None:
        out.append(("weight", module.weight_quantizer))
    for key, q in getattr(module, "esc_weight_quantizers", {}).items():
        out.append((key, q))
    return out
