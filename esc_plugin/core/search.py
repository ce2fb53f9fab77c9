"""ESC step 2: CMA-ES over all activation scales jointly, in ask/tell form.

The optimizer never calls the objective (as in pycma): the caller asks for
candidate amax vectors, evaluates them and tells the losses back. The search
runs on log-multipliers ``z`` of the initial scales, ``amax = init * exp(z)``,
so every candidate scale stays > 0 and σ0 = 0.1 means about ±10 %.
"""
import pickle

import cma
import numpy as np

# A NaN/inf objective counts as the worst value; CMA-ES only uses ranks.
WORST_LOSS = 1e30


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

    def __init__(self, init_amax, sigma0=0.1, budget=100, popsize=None, seed=0):
        self.init_amax = np.asarray(init_amax, dtype=np.float64)
        opts = {"seed": seed + 1, "verbose": -9, "CMA_diagonal": False}
        if popsize:
            opts["popsize"] = popsize
        self._rng = np.random.RandomState(seed)
        saved = np.random.get_state()
        try:
            self.es = cma.CMAEvolutionStrategy(np.zeros(len(self.init_amax)), sigma0, opts)
        finally:
            self._rng_state = np.random.get_state()
            np.random.set_state(saved)
        self.popsize = self.es.popsize
        self.generations = max(1, budget // self.popsize)
        self.generation = 0
        self.evaluations = 0
        self.history = []  # one dict per evaluation
        self._pending = None

    @property
    def done(self):
        return self.generation >= self.generations

    def ask(self):
        """Candidate amax vectors for the next generation (re-asking returns the same ones)."""
        if self._pending is None:
            # cma samples from numpy's global RNG: give it our own stream, then put the caller's back.
            saved = np.random.get_state()
            np.random.set_state(self._rng_state)
            try:
                self._pending = [np.asarray(z) for z in self.es.ask()]
            finally:
                self._rng_state = np.random.get_state()
                np.random.set_state(saved)
        return [self.init_amax * np.exp(z) for z in self._pending]

    def tell(self, candidates, losses):
        losses = [float(v) if np.isfinite(v) else WORST_LOSS for v in losses]
        if self._pending is None or len(losses) != len(self._pending):
            raise ValueError("tell() needs one loss per candidate from the last ask().")
        self.es.tell(self._pending, losses)
        for loss in losses:
            self.history.append({"evaluation": self.evaluations, "generation": self.generation, "loss": loss})
            self.evaluations += 1
        self._pending = None
        self.generation += 1

    def mean_amax(self):
        """The final scales: mean of the search distribution (not the best sample)."""
        return self.init_amax * np.exp(np.asarray(self.es.mean))

    def state_bytes(self):
        return pickle.dumps(self.__dict__)

    @classmethod
    def from_bytes(cls, data):
        obj = cls.__new__(cls)
        obj.__dict__.update(pickle.loads(data))
        return obj
