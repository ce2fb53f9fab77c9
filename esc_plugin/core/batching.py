"""Population batching: k CMA-ES candidates in one forward pass (``QuantConfig(batch_candidates=k)``).

A candidate differs from the others only in its activation amax, so k of
them can share one forward of the calibration batch tiled k times: rows
``j·B … (j+1)·B − 1`` belong to candidate ``j``, and every activation
quantizer fake-quantizes each block of rows with that candidate's amax
(:meth:`~esc_plugin.core.quantizers.ActivationQuantizer.set_candidate_amax`,
the same modelopt arithmetic as per-tensor, so each row is quantized exactly
as alone). Weights do not depend on the candidate.

The objective is not rewritten. It is called once per candidate, and its
*outermost* model calls (the forward loop's ``model(x)``, or Whisper's
encoder / decoder / head calls) are intercepted:

* during candidate 0's call, each outermost call runs once on the tiled
  inputs (a tensor argument whose first dimension is the batch size is
  repeated k times; an earlier call's output is replaced by all k
  candidates' rows of it) and returns candidate 0's rows;
* during candidate j's call, the same calls return candidate j's rows of the
  recorded outputs, without running the model. The arguments are checked
  against candidate 0's (equal inputs; outputs of earlier calls passed on
  unchanged), so an objective whose model inputs depend on earlier outputs in
  another way (autoregressive decoding) is an error, not a wrong result.

The objective's own reduction (metric, distance) therefore runs once per
candidate on that candidate's outputs. Objectives declare that they fit this
scheme with :func:`supports_batching`: their model calls take batch-first
tensors and return per-sample (batch-first) outputs, and they are
deterministic. The distillation objective and the built-in tasks' metrics do.

Example
-------
>>> import torch
>>> from esc_plugin.core.batching import CandidateTiling, supports_batching
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
>>> x = torch.randn(5, 4)
>>> tiling = CandidateTiling(model, quantizers=[], amaxes=[None, None, None])
>>> with tiling:
...     outs = [tiling.run_candidate(j, lambda: model(x)) for j in range(3)]
>>> [tuple(o.shape) for o in outs], all(torch.equal(o, model(x)) for o in outs)
([(5, 3), (5, 3), (5, 3)], True)
>>> supports_batching(lambda m: 0.0)
False
"""
import copy
import threading

import numpy as np
import torch

from .errors import ObjectiveError

#: Attribute an objective sets to True to declare that its model calls can be tiled (see above).
BATCHING_ATTRIBUTE = "supports_candidate_batching"


def supports_batching(objective):
    """Whether ``objective`` declared that ``batch_candidates`` may tile its model calls."""
    return bool(getattr(objective, BATCHING_ATTRIBUTE, False))


def declare_batching(objective, value=True):
    """Mark ``objective`` (a function or object) as batchable; returns it."""
    setattr(objective, BATCHING_ATTRIBUTE, value)
    return objective


class BatchingError(ObjectiveError):
    """The objective's model calls (or the model's layout) cannot be tiled; the message names the fix."""


_FIX = "use batch_candidates=1 for this objective"


class CandidateTiling:
    """Context in which ``run_candidate(j, fn)`` evaluates ``fn`` as candidate ``j`` of a tiled batch.

    ``quantizers`` are the active activation quantizers, ``amaxes`` the k
    candidates' amax vectors (one value per quantizer); ``None`` entries leave
    the quantizers alone (used by the example above).
    """

    def __init__(self, model, quantizers, amaxes):
        self.model, self.quantizers, self.amaxes = model, list(quantizers), list(amaxes)
        self.k = len(self.amaxes)
        self.records = []    # per outermost call: (module, args signature, per-candidate outputs)
        self.chunk_of = {}   # id(returned tensor) -> (call, path, candidate, tensor, version)
        self.full = {}       # (call, path) -> the k·B-row output tensor
        self.candidate, self.call = None, 0
        self._state = threading.local()
        self._patched = []

    # ------------------------------------------------------------------ context
    def __enter__(self):
        if self.amaxes and self.amaxes[0] is not None:
            values = torch.as_tensor(np.stack(self.amaxes), dtype=torch.float32).reshape(self.k, -1)
            for i, q in enumerate(self.quantizers):
                q.set_candidate_amax(values[:, i])
        for module in self.model.modules():
            # a forward already set on the instance (e.g. by esc_plugin.binding) is kept and restored
            self._patched.append((module, module.__dict__.get("forward")))
            module.forward = self._wrap(module, module.forward)
        return self

    def __exit__(self, *exc):
        for module, own in self._patched:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = own
        self._patched = []
        for q in self.quantizers:
            q.set_candidate_amax(None)
            q.candidate_rows = None
        self.records, self.chunk_of, self.full = [], {}, {}
        return False

    def run_candidate(self, j, fn):
        """``fn()`` as candidate ``j`` (0 first: it runs the tiled forwards)."""
        self.candidate, self.call = j, 0
        try:
            out = fn()
        finally:
            self.candidate = None
        if self.call != len(self.records):
            raise BatchingError(
                f"batch_candidates: candidate {j + 1} of {self.k} made {self.call} model calls, candidate 1 made "
                f"{len(self.records)}: the objective's model calls depend on the model's outputs (e.g. "
                f"autoregressive decoding), so they cannot be tiled: {_FIX}.")
        return out

    # ------------------------------------------------------------------ interception
    def _wrap(self, module, original):
        state = self._state

        def forward(*args, **kwargs):
            depth = getattr(state, "depth", 0)
            if depth or self.candidate is None:
                state.depth = depth + 1
                try:
                    return original(*args, **kwargs)
                finally:
                    state.depth = depth
            state.depth = 1
            try:
                return self._outermost(module, original, args, kwargs)
            finally:
                state.depth = 0

        return forward

    def _outermost(self, module, original, args, kwargs):
        index = self.call
        self.call += 1
        signature = self._signature((args, kwargs))
        if self.candidate == 0:
            batch = _first_batch_size((args, kwargs))
            if batch is None:
                raise BatchingError(f"batch_candidates: model call {index + 1} ({type(module).__name__}) has no "
                                    f"tensor argument with a batch dimension to tile: {_FIX}.")
            tiled_args, tiled_kwargs = self._tile((args, kwargs), batch)
            for q in self.quantizers:  # time-major sites find the candidates' rows by the tiled batch size
                q.candidate_rows = self.k * batch
            output = original(*tiled_args, **tiled_kwargs)
            parts = self._split(output, batch, index, (), module)
            self.records.append((module, signature, parts))
            return parts[0]
        if index >= len(self.records) or self.records[index][0] is not module:
            raise BatchingError(f"batch_candidates: candidate {self.candidate + 1} made a model call "
                                f"({type(module).__name__}) that candidate 1 did not make at this point: {_FIX}.")
        recorded_module, recorded, parts = self.records[index]
        if not self._same_inputs(signature, recorded):
            raise BatchingError(
                f"batch_candidates: model call {index + 1} ({type(module).__name__}) got other inputs for "
                f"candidate {self.candidate + 1} than for candidate 1 (inputs computed from the model's outputs "
                f"other than by passing them on unchanged cannot be tiled): {_FIX}.")
        return parts[self.candidate]

    def _signature(self, obj):
        """The call's arguments with earlier outputs replaced by their (call, path) origin."""
        if isinstance(obj, torch.Tensor):
            origin = self.chunk_of.get(id(obj))
            if origin is not None and origin[3] is obj:
                return ("output", origin[0], origin[1], origin[2])
            return obj
        if isinstance(obj, (list, tuple)):
            return type(obj), [self._signature(v) for v in obj]
        if isinstance(obj, dict):
            return type(obj), [(key, self._signature(v)) for key, v in obj.items()]
        return obj

    def _same_inputs(self, got, want):
        if isinstance(want, torch.Tensor):
            return isinstance(got, torch.Tensor) and (got is want or (
                got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)))
        if isinstance(want, tuple) and len(want) == 4 and want[0] == "output":
            return isinstance(got, tuple) and len(got) == 4 and got[:3] == want[:3] and got[3] == self.candidate
        if isinstance(want, tuple) and len(want) == 2 and isinstance(want[1], list):
            if not (isinstance(got, tuple) and len(got) == 2 and got[0] is want[0] and len(got[1]) == len(want[1])):
                return False
            pairs = zip(got[1], want[1])
            if want[0] is not None and issubclass(want[0], dict):
                return all(g[0] == w[0] and self._same_inputs(g[1], w[1]) for g, w in pairs)
            return all(self._same_inputs(g, w) for g, w in pairs)
        try:
            return bool(got == want)
        except Exception:  # objects without a plain equality: identity
            return got is want

    def _tile(self, obj, batch):
        if isinstance(obj, torch.Tensor):
            origin = self.chunk_of.get(id(obj))
            if origin is not None and origin[3] is obj:
                call, path, candidate, tensor, version = origin
                if tensor._version != version:
                    raise BatchingError(f"batch_candidates: an output of model call {call + 1} was modified in "
                                        f"place before being passed to a later call: {_FIX}.")
                return self.full[(call, path)]
            if obj.dim() >= 1 and obj.shape[0] == batch:
                return torch.cat([obj] * self.k)
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*[self._tile(v, batch) for v in obj])
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._tile(v, batch) for v in obj)
        if isinstance(obj, dict):
            out = copy.copy(obj)
            for key, value in obj.items():
                out[key] = self._tile(value, batch)
            return out
        return obj

    def _split(self, obj, batch, call, path, module):
        """k per-candidate copies of an output structure (tensors: candidate j's rows)."""
        if isinstance(obj, torch.Tensor):
            if obj.dim() == 0 or obj.shape[0] != self.k * batch:
                raise BatchingError(
                    f"batch_candidates: model call {call + 1} ({type(module).__name__}) returned a tensor of shape "
                    f"{tuple(obj.shape)} for {self.k} x {batch} tiled samples: outputs must be per sample, batch "
                    f"first (no batch-reduced values): {_FIX}.")
            self.full[(call, path)] = obj
            parts = list(obj.split(batch))
            for j, part in enumerate(parts):
                self.chunk_of[id(part)] = (call, path, j, part, part._version)
            return parts
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            columns = [self._split(v, batch, call, path + (i,), module) for i, v in enumerate(obj)]
            return [type(obj)(*[c[j] for c in columns]) for j in range(self.k)]
        if isinstance(obj, (list, tuple)):
            columns = [self._split(v, batch, call, path + (i,), module) for i, v in enumerate(obj)]
            return [type(obj)(c[j] for c in columns) for j in range(self.k)]
        if isinstance(obj, dict):
            columns = {key: self._split(v, batch, call, path + (key,), module) for key, v in obj.items()}
            parts = []
            for j in range(self.k):
                part = copy.copy(obj)
                for key, column in columns.items():
                    part[key] = column[j]
                parts.append(part)
            return parts
        return [obj] * self.k


def _first_batch_size(obj):
    """First dimension of the first tensor (depth first) among a call's arguments."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        size = _first_batch_size(item)
        if size is not None:
            return size
    return None
