"""ESC step 2: CMA-ES over all activation scales jointly, in ask/tell form.

The optimizer never calls the objective (as in pycma): the caller asks for
candidate amax vectors, evaluates them and tells the losses back.

CMA-ES needs the variables on a common scale (layer ranges differ by 100x),
so σ0 = 0.1 is relative. Two parametrisations, both keeping every scale > 0:

* ``"range"``: ``amax = max_i * u_i`` with ``u`` in ``[1e-3, 1]``
  (cma's bound handling), starting at ``u = init / max``. σ0 = 0.1 is a tenth of
  each layer's observed range, so the search can move a scale far from its
  init when the task needs it (e.g. clip a dominant MFCC coefficient).
* ``"log"`` (default): ``amax = init * exp(z)``, σ0 = 0.1 ≈ ±10 % around the
  init; a local polish of the output-MSE init.

Restarts (``restarts=k``, IPOP within a fixed budget): Γ is split into k + 1
runs; run ``r`` has population ``λ·2^r`` and a share of Γ proportional to it
(so every run lasts about as many generations), and starts from the best
sample found so far with σ0. Γ ≈ 100 leaves CMA-ES only ~10 generations, too
few for cma's own stopping rules to fire, so the switch points are planned
rather than triggered. The final mean is the last run's.
"""
import contextlib

import cma
import numpy as np

from .errors import ConfigError

# A NaN/inf objective counts as the worst value; CMA-ES only uses ranks.
WORST_LOSS = 1e30
# "range" space: smallest scale as a fraction of the layer's observed max.
MIN_FRACTION = 1e-3


class ScaleSearch:
    """CMA-ES over activation scales.

    Example
    -------
    >>> import numpy as np
    >>> search = ScaleSearch(np.array([1.0, 2.0]), sigma0=0.1, budget=12, popsize=4, seed=0)
    >>> while not search.done:
    ...     cands = search.ask()
    ...     search.tell(cands, [float(np.sum((np.log(c) - np.log([1.5, 1.5])) ** 2)) for c in cands])
    >>> search.evaluations
    12
    >>> bool(np.all(search.mean_amax() > 0))
    True
    """

    def __init__(self, init_amax, sigma0=0.1, budget=100, popsize=None, seed=0, max_amax=None, space="log",
                 restarts=0):
        self.init_amax = np.asarray(init_amax, dtype=np.float64)
        if space not in ("range", "log"):
            raise ValueError(f"space={space!r}: use 'range' or 'log'.")
        self.space = space
        self.max_amax = np.maximum(np.asarray(max_amax if max_amax is not None else self.init_amax,
                                              dtype=np.float64), self.init_amax)
        self.sigma0, self.seed, self.budget = sigma0, seed, int(budget)
        # cma's default population, shrunk so one generation never exceeds the budget Γ
        popsize = popsize or 4 + int(3 * np.log(max(len(self.init_amax), 1)))
        self.run_popsizes, self.run_ends = _ipop_plan(max(2, min(popsize, budget)), self.budget, restarts)
        self.run = 0
        self._rng_state = None
        self.es = self._new_es(self._x_of(self.init_amax))
        self.popsize = self.es.popsize
        self.generation = 0
        self.evaluations = 0
        self.history = []  # one dict per evaluation
        self.best_amax, self.best_loss, self.best_selection = None, np.inf, None
        self._pending = None

    def _x_of(self, amax):
        if self.space == "range":
            return np.clip(amax / self.max_amax, MIN_FRACTION, 1.0)
        return np.log(np.asarray(amax) / self.init_amax)

    def _new_es(self, x0):
        opts = {"seed": self.seed + 1 + self.run, "verbose": -9, "popsize": self.run_popsizes[self.run]}
        if self.space == "range":
            opts["bounds"] = [MIN_FRACTION, 1.0]
        # cma seeds numpy's global RNG: keep this search's stream apart from the caller's
        saved = np.random.get_state()
        try:
            es = cma.CMAEvolutionStrategy(x0, self.sigma0, opts)
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(saved)
        return es

    @property
    def done(self):
        return self.evaluations >= self.budget

    def ask(self):
        """Candidate amax vectors for the next generation (re-asking returns the same ones).

        The last generation returns only as many candidates as the budget has left.
        """
        if self._pending is None:
            with self._own_rng():
                self._pending = [np.asarray(z) for z in self.es.ask()]
        left = self.run_ends[self.run] - self.evaluations
        return [self._to_amax(x) for x in self._pending[:left]]

    @contextlib.contextmanager
    def _own_rng(self):
        """cma draws from numpy's global RNG (in ask and tell): give it this
        search's own stream, then put the caller's back, so results depend on
        the seed alone and resuming reproduces an uninterrupted run."""
        saved = np.random.get_state()
        np.random.set_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(saved)

    def _to_amax(self, x):
        if self.space == "range":
            return self.max_amax * np.clip(x, MIN_FRACTION, 1.0)
        return self.init_amax * np.exp(x)

    def tell(self, candidates, losses, selections=None):
        """Losses of the asked candidates; ``selections`` (optional) are their held-back scores,
        kept in the history for the selection guard and the convergence plot (never told to cma)."""
        losses = [float(v) if np.isfinite(v) else WORST_LOSS for v in losses]
        if self._pending is None or len(losses) != len(candidates) or \
                len(losses) != min(len(self._pending), self.run_ends[self.run] - self.evaluations):
            raise ValueError("tell() needs one loss per candidate from the last ask().")
        # A partial last generation updates the distribution when cma can use it (>= mu
        # solutions); otherwise its candidates only count as samples (best sample, history).
        if len(losses) >= self.es.sp.weights.mu:
            with self._own_rng():
                self.es.tell(self._pending[:len(losses)], losses)
        selections = selections if selections is not None else [None] * len(losses)
        for amax, loss, selection in zip(candidates, losses, selections):
            entry = {"evaluation": self.evaluations, "generation": self.generation, "run": self.run,
                     "loss": loss}
            if selection is not None:
                entry["selection"] = float(selection)
            self.history.append(entry)
            self.evaluations += 1
            if loss < self.best_loss:
                self.best_amax, self.best_loss = np.asarray(amax, dtype=np.float64), loss
                self.best_selection = selection
        self._pending = None
        self.generation += 1
        if self.evaluations >= self.run_ends[self.run] and not self.done:
            self.run += 1  # IPOP: a larger population, from the best sample so far
            self.es = self._new_es(self._x_of(self.best_amax))

    def mean_amax(self):
        """The final scales: mean of the search distribution (not the best sample)."""
        return self._to_amax(np.asarray(self.es.mean))


def _ipop_plan(popsize, budget, restarts):
    """Populations and cumulative budget ends of the ``restarts + 1`` runs.

    >>> _ipop_plan(10, 100, 1)
    ([10, 20], [33, 100])
    >>> _ipop_plan(10, 100, 0)
    ([10], [100])
    """
    sizes = [popsize * 2 ** r for r in range(restarts + 1)]
    ends = [int(round(budget * sum(sizes[:r + 1]) / sum(sizes))) for r in range(len(sizes))]
    if restarts and min(np.diff([0] + ends)) < 2:
        raise ConfigError(f"restarts={restarts} leaves a run fewer than 2 evaluations of budget={budget}: "
                          "raise the budget or use fewer restarts.")
    # a run never asks more than its share: shrink a population that exceeds it
    sizes = [min(s, e - b) if restarts else s for s, b, e in zip(sizes, [0] + ends[:-1], ends)]
    return sizes, ends
