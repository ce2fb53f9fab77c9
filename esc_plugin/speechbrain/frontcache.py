"""Compute the float front end of a Brain once per calibration batch, not once per candidate.

Every ESC candidate runs ``compute_forward`` on the same calibration batches.
What a recipe computes there before the first quantized op (MFCC / Fbank
features, input normalisation) cannot depend on the scales, yet it would be
recomputed for each of the Γ evaluations. The stage records, in its FP32
pass, the inputs and outputs of the float front-end callables per
(batch, call) and returns the recorded output when a later call gets equal
inputs. Candidates are only what is float by construction:

* hparams entries that are ``nn.Module`` s outside ``brain.modules`` or plain
  functions (e.g. honk's ``compute_features: !name:compute_mfcc``): the stage
  quantizes ``brain.modules`` only, so these are never quantized;
* ``brain.modules`` entries named by ``quantization.exclude``, and only while
  their weights equal the FP32 ones.

An entry is kept only when its inputs hold a tensor and nothing but tensors,
numbers and strings (no module, no object), and its output is tensors: a
factory (``!name:`` of a class) or a call with an object argument is never
cached. A call whose inputs differ from the recorded ones (anything behind a
quantized op) runs normally, so the objective values are those without the
cache (tested).

Example
-------
>>> import types, torch
>>> calls = []
>>> def mfcc(x):
...     calls.append(1)
...     return x * 2
>>> brain = types.SimpleNamespace(modules=torch.nn.ModuleDict(), hparams=types.SimpleNamespace(feats=mfcc))
>>> cache = FrontEndCache(brain)
>>> x = torch.ones(3)
>>> for _ in range(3):  # the FP32 pass, then two candidates
...     with cache.applied(brain, brain.modules):
...         cache.start_batch(0)
...         y = brain.hparams.feats(x)
...     cache.recording = False
>>> len(calls), cache.hits, brain.hparams.feats is mfcc
(1, 2, True)
"""
import contextlib
import fnmatch
import functools

import torch
import torch.nn as nn

_MISSING = object()


def _leaves(tree):
    if isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _leaves(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _leaves(x)
    else:
        yield tree


def _plain_inputs(tree):
    leaves = list(_leaves(tree))
    return (any(isinstance(x, torch.Tensor) for x in leaves)
            and all(isinstance(x, (torch.Tensor, int, float, bool, str, type(None))) for x in leaves))


def _tensor_output(tree):
    leaves = list(_leaves(tree))
    return bool(leaves) and all(isinstance(x, (torch.Tensor, type(None))) for x in leaves)


def _map(fn, tree):
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple (SpeechBrain's PaddedData)
        return type(tree)(*[_map(fn, x) for x in tree])
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, x) for x in tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _clone(tree):
    return _map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _equal(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _is_function(value):
    while isinstance(value, functools.partial):
        value = value.func
    # classes (``!name:`` of a class) build new objects on each call: never cached
    return callable(value) and not isinstance(value, type) and not isinstance(value, nn.Module) \
        and hasattr(value, "__code__")


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class FrontEndCache:
    """Per-batch cache of the Brain's float front end (see the module doc)."""

    def __init__(self, brain, exclude=()):
        inside = {id(m) for m in brain.modules.modules()}
        hp = vars(brain.hparams)
        self.hparams_keys = [k for k, v in hp.items() if _is_function(v) or (
            isinstance(v, nn.Module) and not any(id(m) in inside for m in v.modules()))]
        self.module_keys = [k for k in brain.modules.keys() if any(fnmatch.fnmatch(k, p) for p in exclude)]
        self.fp32 = {k: brain.modules[k] for k in self.module_keys}
        self.entries, self.counts = {}, {}
        self.batch, self.recording = None, True
        self.hits = self.misses = 0
        self.cached_keys = set()

    def start_batch(self, index):
        """The calls that follow belong to calibration batch ``index``."""
        self.batch, self.counts = index, {}

    def _wrap(self, key, fn):
        def call(*args, **kwargs):
            if self.batch is None:
                return fn(*args, **kwargs)
            n = self.counts[key] = self.counts.get(key, -1) + 1
            slot = (key, self.batch, n)
            entry = self.entries.get(slot, _MISSING)
            if entry is not _MISSING and entry is not None and _equal(entry[0], (args, kwargs)):
                self.hits += 1
                return _clone(entry[1])
            out = fn(*args, **kwargs)
            if entry is _MISSING and self.recording:
                keep = _plain_inputs((args, kwargs)) and _tensor_output(out)
                self.entries[slot] = (_clone((args, kwargs)), _clone(out)) if keep else None
                self.cached_keys.update([key] if keep else [])
            elif entry is not None:
                self.misses += 1
            return out
        return call

    @contextlib.contextmanager
    def applied(self, brain, modules):
        """Within the block, the front-end callables of ``brain`` (bound to ``modules``) use the cache."""
        hp = vars(brain.hparams)
        saved_hp, patched = {}, []
        for key in self.hparams_keys:
            value = hp.get(key)
            if isinstance(value, nn.Module):
                patched.append((value, value.__dict__.get("forward", _MISSING)))
                value.forward = self._wrap(key, value.forward)
            elif value is not None:
                saved_hp[key], hp[key] = value, self._wrap(key, value)
        for key in self.module_keys:
            module = modules[key] if key in modules else None
            # only while it is the FP32 module or an unchanged copy of it
            if module is not None and (module is self.fp32[key] or _same_weights(module, self.fp32[key])):
                patched.append((module, module.__dict__.get("forward", _MISSING)))
                module.forward = self._wrap("modules." + key, module.forward)
        try:
            yield self
        finally:
            self.batch = None
            hp.update(saved_hp)
            for module, forward in reversed(patched):
                if forward is _MISSING:
                    del module.__dict__["forward"]
                else:
                    module.__dict__["forward"] = forward

    def note(self):
        """One line for the report."""
        keys = sorted(self.cached_keys)
        return (f"front-end cache: {', '.join(keys) or 'nothing cacheable'} computed once per calibration "
                f"batch ({self.hits} cached calls, {self.misses} recomputed on changed inputs)")
