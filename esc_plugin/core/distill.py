"""Label-free objective: distance of the quantized model's outputs to the FP32 model's.

The targets are the FP32 outputs of the model's root ``forward`` on the
caller's own forward loop, recorded once by a hook during the statistics
pass (the loop itself is not changed). Each later evaluation runs the same
loop on the quantized copy and compares call by call:

* ``kl``: KL(softmax(FP32) || softmax(quantized)) over the last dimension,
  for logits (classifiers, CTC, token logits);
* ``mse``: mean squared error normalised by the FP32 output's mean square,
  for everything else (features, spectrograms, masks, embeddings).

``auto`` chooses, per recorded call, ``kl`` when the output is produced by
the model's last ``nn.Linear`` (a classification / vocabulary head) and
``mse`` otherwise; the report says what it chose. When the loop calls
sub-modules instead of the root (Whisper: encoder, decoder, then the
vocabulary projection on teacher-forced FP32 tokens), the outermost calls
are the ones compared.

The samples (rows of the batch dimension) are split into a search part and
a held-back selection part (every k-th sample), so the selection guard can compare the
search's results on outputs the search never optimised; both parts come
from the same forward pass, so the guard costs no extra evaluation.
"""
import math

import torch
import torch.nn.functional as F

from .errors import CalibrationError

_EPS = 1e-12


def output_tensors(output):
    """Floating-point tensors in a model output (tensor, tuple, list, dict, or an object with fields)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        items = list(output.values())
    elif isinstance(output, (list, tuple)):
        items = list(output)
    elif hasattr(output, "__dict__") and not isinstance(output, torch.nn.Module):
        items = list(vars(output).values())
    else:
        return []
    return [t for item in items for t in output_tensors(item)]


class OutputRecorder:
    """Hooks recording the outputs of the *outermost* module calls the forward loop makes.

    Usually that is one call of the root module per batch. A loop that calls
    sub-modules directly (Whisper's encoder, then its decoder, then the
    vocabulary projection) gets each of those outermost calls recorded
    instead. Each record notes whether the call was the model's last
    ``nn.Linear`` or returned its output (a classification / vocabulary head).
    """

    def __init__(self, model):
        self.outputs, self.heads = [], []
        self._depth, self._last_linear_out = 0, None
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self._head = linears[-1] if linears else None
        self._handles = []
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module, args):
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth -= 1
        if module is self._head:
            self._last_linear_out = output
        if self._depth == 0:
            tensors = output_tensors(output)
            self.heads.append(module is self._head or any(t is self._last_linear_out for t in tensors))
            self.outputs.append([t.detach().float() for t in tensors])

    def close(self):
        for h in self._handles:
            h.remove()


def _rows(x):
    return x.reshape(1, -1) if x.dim() == 0 else x.reshape(x.shape[0], -1) if x.dim() == 1 else x


def _finite(t):
    """``None`` when every element of an FP32 output is finite, else its mask of finite elements.

    The targets never change, so :class:`DistillObjective` computes this once per target
    rather than in every evaluation of the search.
    """
    finite = torch.isfinite(t)
    return None if bool(finite.all()) else finite


_MEASURE = object()  # "compute the mask here" (direct calls), as opposed to a precomputed None / mask


def _kl(q, t, finite=_MEASURE):
    """Per-row (first dimension) KL of softmax over the last dimension.

    Classes the FP32 model gives no probability (a ``-inf`` logit: a masked
    softmax, e.g. an aligner's log-probabilities over padding) add nothing,
    as in the KL itself; ``F.kl_div`` would make them NaN.
    """
    finite = _finite(t) if finite is _MEASURE else finite
    if t.dim() < 2 or t.shape[-1] < 2:
        return _mse(q, t, finite)
    t_log, q_log = F.log_softmax(t, dim=-1), F.log_softmax(q, dim=-1)
    if finite is None:
        kl = F.kl_div(q_log, t_log, log_target=True, reduction="none").sum(-1)
    else:  # t_log is finite exactly where t is (a row of only -inf is masked either way)
        kl = torch.where(finite & torch.isfinite(t_log), t_log.exp() * (t_log - q_log), 0.0).sum(-1)
    return kl.reshape(kl.shape[0], -1).mean(1) if kl.dim() > 1 else kl


def _mse(q, t, finite=_MEASURE):
    """Per-row squared error, normalised by the target's mean square over the whole call.

    Elements where the FP32 output is not finite (``-inf`` fill of masked
    positions) are not compared: no scale can match them, and one of them
    would make every candidate's distance NaN. Where the FP32 output is
    finite and the quantized one is not, the distance is infinite.
    """
    finite = _finite(t) if finite is _MEASURE else finite
    if finite is None:
        err = ((q - t) ** 2)
        err = err.reshape(err.shape[0], -1).mean(1) if err.dim() > 1 else err.reshape(-1)
        return err / ((t ** 2).mean() + _EPS)
    err = torch.where(finite, q - t, 0.0) ** 2
    if err.dim() > 1:
        kept = finite.reshape(finite.shape[0], -1).sum(1).clamp_min(1)
        err = err.reshape(err.shape[0], -1).sum(1) / kept
    else:
        err = err.reshape(-1)
    return err / ((t[finite] ** 2).mean() + _EPS) if bool(finite.any()) else err


class DistillObjective:
    """``objective(model) -> float`` against recorded FP32 outputs; see the module docstring.

    Distances are per row of the batch dimension, so the held-back part can be
    every k-th *sample* even when the forward loop runs all of them in one call.

    Arguments
    ---------
    forward_loop : callable
        The caller's calibration loop.
    targets : list
        Per root call, the list of FP32 output tensors.
    kind : str
        ``kl`` or ``mse``.
    holdout : float
        Fraction of rows (samples) held back for selection (0: none).
    """

    # Its model calls are the forward loop's (batch-first for the integrations' models) and the
    # distances are per sample: QuantConfig(batch_candidates=k) can tile them (core/batching.py).
    supports_candidate_batching = True

    def __init__(self, forward_loop, targets, kind, holdout=0.0, heads=None):
        if not targets or not any(targets):
            raise CalibrationError(
                "the distillation objective found no tensor outputs: the model's forward must return a "
                "tensor (or a tuple/dict of tensors) for the forward loop's calls, or pass an objective "
                "(a callable objective(model) -> float).")
        self.forward_loop, self.targets, self.kind = forward_loop, targets, kind
        self.finite = [[_finite(t) for t in ts] for ts in targets]  # once: the targets never change
        # per call: KL for head outputs when kind is "auto", else the kind asked for
        heads = heads if heads is not None else [False] * len(targets)
        self.kinds = [("kl" if h else "mse") if kind == "auto" else kind for h in heads]
        rows = [(_rows(ts[0]).shape[0] if ts else 0) for ts in targets]
        n = sum(rows)
        # at least one held-back sample whenever there are two or more
        every = max(2, min(round(1 / holdout), n)) if holdout > 0 and n >= 2 else 0
        index = torch.arange(n)
        held = (index % every == every - 1) if every else torch.zeros(n, dtype=torch.bool)
        self.held = list(torch.split(held, rows)) if n else []
        self.last_selection = None

    @property
    def splits(self):
        return any(bool(h.any()) for h in self.held)

    def __call__(self, model):
        recorder = OutputRecorder(model)
        try:
            with torch.no_grad():
                self.forward_loop(model)
        finally:
            recorder.close()
        if len(recorder.outputs) != len(self.targets):
            raise CalibrationError(
                f"the forward loop made {len(recorder.outputs)} model calls, but {len(self.targets)} when the "
                "FP32 targets were recorded: the distillation objective needs a deterministic loop (same "
                "batches, same order) — e.g. no shuffling dataloader.")
        search, held = [], []
        for got, want, finite, mask, kind in zip(recorder.outputs, self.targets, self.finite, self.held,
                                                 self.kinds):
            distance = _kl if kind == "kl" else _mse
            per_row = sum(distance(q.to(t.device), t, f).cpu() for q, t, f in zip(got, want, finite)) / max(
                len(want), 1)
            if per_row.numel() != mask.numel():  # outputs without a batch dimension: the call is one row
                per_row, mask = per_row.mean().reshape(1), mask[:1]
            search.append(per_row[~mask])
            held.append(per_row[mask])
        self.last_selection = _mean(held) if self.splits else None
        return _mean(search)


def _mean(parts):
    values = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
    out = float(values.mean()) if values.numel() else float("inf")
    return out if math.isfinite(out) else float("inf")


def describe_kinds(kinds):
    """``"kl"``, ``"mse"`` or e.g. ``"kl on 9 head calls, mse on 18 others"`` for the report."""
    n_kl = sum(k == "kl" for k in kinds)
    if n_kl in (0, len(kinds)):
        return kinds[0] if kinds else "mse"
    return f"kl on {n_kl} head calls, mse on {len(kinds) - n_kl} others"
