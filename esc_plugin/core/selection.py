"""ESC step 3: which of the search's results becomes the final scales.

The paper takes the mean of the final search distribution. The search only
sees the objective on the calibration samples, so the mean can score worse
than where it started; with ``keep_init_if_worse`` the candidates (search
mean first, then the start point) are compared on the objective and the best
is kept, ties going to the earlier candidate (the paper's choice).
"""
import numpy as np

from .search import WORST_LOSS


def choose(candidates, keep_best=True):
    """Pick one of ``[(name, amax, score), ...]`` (the first is the paper's choice).

    Example
    -------
    >>> import numpy as np
    >>> choose([("mean", np.ones(2), 0.3), ("init", np.zeros(2), 0.2)])[0]
    'init'
    >>> choose([("mean", np.ones(2), 0.3), ("init", np.zeros(2), 0.2)], keep_best=False)[0]
    'mean'
    """
    if not keep_best:
        return candidates[0]
    scores = [np.inf if s is None or not np.isfinite(s) else s for _, _, s in candidates]
    return candidates[int(np.argmin(scores))]


def gate_by_distance(ctx, candidates, ratio, known=None, what="candidates"):
    """``{name: ratio to the closest}`` of the ``[(name, amax, score), ...]`` farther from the FP32
    outputs than ``ratio`` x the closest one.

    The distance is the context's label-free one (``ctx.distance_of``), on every
    calibration sample; ``known`` maps names to distances already measured, the
    others are measured and recorded as ``report.objective["distance_<name>"]``.
    Nothing is left out without a distance, a ratio or any finite distance.
    """
    if ratio is None or ctx.distance is None:
        return {}
    known = {} if known is None else known  # filled in place: the caller keeps the distances
    distances = {}
    for name, amax, _ in candidates:
        if name not in known:
            value = ctx.distance_of(amax)
            if ctx.distance is None:  # turned off while measuring (see CalibrationContext.distance_of)
                return {}
            known[name] = ctx.report.objective[f"distance_{name}"] = value
        distances[name] = known[name]
    # the evaluator reports a non-finite distance as WORST_LOSS, which must not count as measured
    finite = {n: d for n, d in distances.items() if d is not None and np.isfinite(d) and d < WORST_LOSS}
    if not finite:
        ctx.report.notes.append("distance gate off: no candidate had a finite distance to the FP32 outputs")
        return {}
    closest = min(finite, key=finite.get)
    far = {n: (d / finite[closest] if finite[closest] > 0 else np.inf)
           for n, d in distances.items() if n not in finite or d > ratio * finite[closest]}
    if far:
        listed = ", ".join(f"{n} ({r:.3g}x)" for n, r in far.items())
        ctx.report.notes.append(f"distance gate: left out the {what} {listed}: farther from the FP32 outputs "
                                f"than {ratio:g}x the closest ({closest})")
    return far


class SplitObjective:
    """An objective over ``n`` calibration parts (samples, batches) that the selection guard can split.

    ``fn(model, indices)`` scores the parts at ``indices`` (``None``: all).
    ``split(fraction)`` returns ``(search, selection)`` objectives over
    disjoint parts: every k-th part (k = round(1 / fraction)) is held back.
    ``sizes`` (samples per part, e.g. the batch sizes of a data loader whose
    last batch is short): of the k ways to take every k-th part, the one whose
    held-back samples are closest to ``fraction`` of all is used, so a short
    last batch is not the whole held-back part.
    With fewer than two parts there is nothing to hold back: ``split`` is
    ``None`` and the pipeline notes that the guard is off.

    Example
    -------
    >>> obj = SplitObjective(lambda m, idx: float(10 if idx is None else len(idx)), 10)
    >>> search, select = obj.split(0.2)
    >>> obj(None), search(None), select(None)
    (10.0, 8.0, 2.0)
    >>> SplitObjective(lambda m, idx: 0.0, 1).split is None
    True
    >>> batches = SplitObjective(lambda m, idx: 0.0, 5, sizes=[24, 24, 24, 24, 4])
    >>> batches.split(0.2)[1].indices  # a full batch (24 of 100 samples), not the short one (4)
    [3]
    """

    #: set True when ``fn``'s model calls can be tiled by ``QuantConfig(batch_candidates=k)``
    #: (see :mod:`esc_plugin.core.batching`); its two parts inherit it
    supports_candidate_batching = False

    def __init__(self, fn, n, sizes=None):
        self.fn, self.n = fn, n
        self.sizes = None if sizes is None else [float(s) for s in sizes]
        if self.sizes is not None and len(self.sizes) != n:
            raise ValueError(f"sizes has {len(self.sizes)} entries for {n} parts")
        if n < 2:
            self.split = None

    def __call__(self, model):
        return self.fn(model, None)

    def split(self, fraction):
        every = max(2, min(round(1 / fraction), self.n))
        offset = every - 1
        if self.sizes is not None and sum(self.sizes) > 0:
            total = sum(self.sizes)

            def gap(o):
                return abs(sum(s for i, s in enumerate(self.sizes) if i % every == o) / total - fraction)

            offset = min(reversed(range(every)), key=gap)  # ties: the last offset, as without sizes
        held = [i for i in range(self.n) if i % every == offset]
        rest = [i for i in range(self.n) if i % every != offset]
        self.held_back = f"{len(held)} of {self.n} parts"
        if self.sizes is not None:
            self.held_back += f", {sum(self.sizes[i] for i in held):g} of {sum(self.sizes):g} samples"
        return _Part(self, rest), _Part(self, held)


class _Part:
    """``fn(model, indices)`` for one part of a :class:`SplitObjective` (picklable, unlike a lambda)."""

    def __init__(self, whole, indices):
        self.fn, self.indices = whole.fn, indices
        self.supports_candidate_batching = whole.supports_candidate_batching

    def __call__(self, model):
        return self.fn(model, self.indices)
