"""The calibration context handed to calibrators and PTQ passes.

It holds the quantized copy, its quantization sites, the caller's forward
loop and objective, the FP32 statistics and the report, and evaluates a
vector of activation amax values on the objective. Calibrators and passes
see nothing else, so one can be written without knowing the pipeline.
"""
import math
import time

import numpy as np
import torch

from .errors import CalibrationError, ObjectiveError
from .search import WORST_LOSS


class Evaluator:
    """Calls the user's objective for a vector of activation amax values.

    Non-finite values count as :data:`WORST_LOSS` for the search, and are
    counted (``n_nonfinite``) so a run whose objective is never finite fails
    loudly instead of "succeeding".
    """

    def __init__(self, objective, qmodel, plan):
        self.objective, self.qmodel, self.plan = objective, qmodel, plan
        self.count, self.seconds, self.n_nonfinite = 0, 0.0, 0
        self.last_selection = None  # held-back score of the last evaluation, when the objective splits

    def __call__(self, amax):
        if not callable(self.objective):
            return None
        if amax is not None:
            self.plan.set_act_amax(amax)
        t = time.perf_counter()
        try:
            with torch.no_grad():
                value = float(self.objective(self.qmodel))
        except (ObjectiveError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ObjectiveError(
                f"the objective raised {type(exc).__name__}: {exc} (evaluation {self.count + 1}). "
                "It must return the task error (a float, lower is better) for the model it is given; "
                "run it once on the FP32 model to debug. The FP32 model is untouched."
            ) from exc
        self.seconds += time.perf_counter() - t
        self.count += 1
        sel = getattr(self.objective, "last_selection", None)
        self.last_selection = sel if sel is None or math.isfinite(sel) else WORST_LOSS
        if not math.isfinite(value):
            self.n_nonfinite += 1
            return WORST_LOSS
        return value


class CalibrationContext:
    """What a calibrator or PTQ pass works with.

    Attributes
    ----------
    model : torch.nn.Module
        The quantized copy (the FP32 model is never reachable from here).
    plan : QuantPlan
        Its quantization sites (``plan.points``).
    config : QuantConfig
    forward_loop, objective : callable
        The caller's; ``objective`` may be None.
    report : QuantReport
    progress : bool
        Whether to show tqdm bars.
    sites : list
        The active sites (executed by ``forward_loop``), in the order of
        every amax vector.
    maxes : numpy.ndarray
        FP32 max |x| per active site.
    """

    def __init__(self, model, plan, config, forward_loop, objective, report, progress=True):
        self.model, self.plan, self.config = model, plan, config
        self.forward_loop, self.objective = forward_loop, objective
        self.report, self.progress = report, progress
        self.sites, self.maxes = [], np.zeros(0)
        self.observers = {}
        self._histograms = None
        self.evaluator = Evaluator(objective, model, plan)
        self.selection_objective = None  # a separate held-back objective (from objective.split)
        self.distance = None  # label-free distance to the FP32 outputs beside a given objective, if wanted
        self.distance_evaluator = None
        self.model_digest = None

    def use_objective(self, objective, selection_objective=None):
        """Replace the objective (e.g. by the distillation objective) before calibration."""
        self.objective, self.selection_objective = objective, selection_objective
        self.evaluator.objective = objective

    def evaluate_selection(self, amax):
        """The held-back score of ``amax``: a separate selection objective, or None."""
        if self.selection_objective is None:
            return None
        return Evaluator(self.selection_objective, self.model, self.plan)(amax)

    def distance_of(self, amax):
        """The distance of the outputs with these amax values to the FP32 outputs (None without one)."""
        if self.distance is None:
            return None
        if self.distance_evaluator is None:
            self.distance_evaluator = Evaluator(self.distance, self.model, self.plan)
        try:
            value = self.distance_evaluator(amax)
        except ObjectiveError as exc:
            if not isinstance(exc.__cause__, CalibrationError):
                raise
            # e.g. a loop whose model calls depend on the outputs (greedy decoding stops
            # earlier): no distance to compare, so the gate is off, not the run
            self.distance = self.distance_evaluator = None
            self.report.notes.append(f"distance gate off: {exc.__cause__}")
            return None
        self.report.timings["n_distance_evaluations"] = self.distance_evaluator.count
        self.report.timings["distance_seconds"] = self.distance_evaluator.seconds
        return value

    @property
    def has_objective(self):
        return callable(self.objective)

    def evaluate(self, amax):
        """Objective with these activation amax values (``None`` without an objective)."""
        return self.evaluator(amax)

    def set_amax(self, amax):
        self.plan.set_act_amax(amax)

    def samples(self, site):
        """The bounded FP32 input sample of one site (a list of tensors)."""
        obs = self.observers.get(site.name)
        return obs.inputs() if obs is not None else []

    def histograms(self):
        """``{site name: observer with .hist / .edges}``: one extra FP32 pass on first use."""
        if self._histograms is None:
            from .plan import observe

            t = time.perf_counter()
            self._histograms = observe(
                self.plan, self.model, self.forward_loop, self.config.seed, bins=self.config.histogram_bins,
                hist_ranges={p.name: float(m) for p, m in zip(self.sites, self.maxes) if m > 0},
                nan_policy=self.config.nan_policy)
            self.report.timings["histograms"] = time.perf_counter() - t
        return self._histograms

    def per_site_histogram(self, fn):
        """``fn(hist, edges)`` per active site; sites never seen non-zero keep their max."""
        hobs = self.histograms()
        out = []
        for p, m in zip(self.sites, self.maxes):
            o = hobs.get(p.name)
            ok = o is not None and o.hist is not None and m > 0
            out.append(fn(o.hist.numpy(), o.edges) if ok else m)
        return np.array(out, dtype=np.float64)

    def baseline(self, name):
        """The amax another registered calibrator would choose (for composition)."""
        from .registry import get_calibrator

        return np.asarray(get_calibrator(name).cls(self.config).calibrate(self), dtype=np.float64)

    def release_statistics(self):
        self.observers, self._histograms = {}, None
