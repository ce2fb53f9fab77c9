"""``esc``: output-MSE init per layer, CMA-ES over all scales on the task objective.

The three steps are separate modules: :mod:`~esc_plugin.core.local_init`
(Eq. 4), :mod:`~esc_plugin.core.search_driver` (ask/evaluate/tell with
checkpoints) and :mod:`~esc_plugin.core.selection` (which result is kept).
With ``QuantConfig(init="best")`` (the default) the baselines' scales are
extra starting candidates, judged on the objective among those not far from
the FP32 outputs (``distance_gate``); ``init="output_mse"`` starts from Eq. 4
alone, as the paper does.
"""
import time

import numpy as np
import torch

from ..errors import ObjectiveError
from ..local_init import local_init
from ..registry import register_calibrator
from ..search_driver import SearchDriver, run_fingerprint
from ..selection import choose, gate_by_distance

BASELINES = ("max", "percentile", "entropy", "mse")


@register_calibrator("esc", needs=("max", "samples"), objective="optional",
                     summary="ESC: output-MSE init + CMA-ES on the task objective")
class EscCalibrator:
    def __init__(self, config):
        self.config = config
        self.starts = []  # [(name, amax, search-part score)] of the start candidates not taken as the init
        self.distances = {}  # label-free distance to the FP32 outputs of each candidate measured (the gate)

    @staticmethod
    def wants_fp32_distance(config):
        """Whether the pipeline should record the FP32 outputs beside a given objective (the distance gate)."""
        return config.init == "best" and config.distance_gate is not None

    def calibrate(self, ctx):
        cfg, report = self.config, ctx.report
        fingerprint = run_fingerprint(cfg, [s.name for s in ctx.sites], ctx.model_digest, ctx.maxes)
        driver = SearchDriver.resume(ctx, fingerprint) if cfg.checkpoint else None
        if driver is not None:
            report.notes.append(f"resumed from {cfg.checkpoint} at generation {len(driver.generations)}")
            self._restore(driver.calibrator_state)
        else:
            driver = self._start(ctx, fingerprint)
        report.objective["init"] = driver.init_objective
        for layer, value in zip(report.layers, driver.init):
            layer.init = float(value)

        t = time.perf_counter()
        search = driver.run()
        mean = search.mean_amax()
        report.objective["final"] = ctx.evaluate(mean)
        mean_selection = ctx.evaluator.last_selection
        report.objective["best_sample"] = search.best_loss
        report.history = search.history
        name, amax, score = self._select(ctx, driver, search, mean, mean_selection)
        report.objective["chosen"] = score
        report.timings["search"] = time.perf_counter() - t
        report.timings["n_search_evaluations"] = search.evaluations
        self._check_finite(ctx)
        return np.asarray(amax, dtype=np.float64)

    def _select(self, ctx, driver, search, mean, mean_selection):
        """The selection guard when the objective has a held-back part, else the paper's mean
        (or the init when the mean scores worse, with ``keep_init_if_worse``)."""
        report, cfg = ctx.report, self.config
        guarded = ctx.selection_objective is not None or mean_selection is not None
        if not guarded:
            rows = self._gated([("mean", mean, report.objective["final"]),
                                ("init", driver.init, driver.init_objective)], ctx)
            name, amax, score = choose(rows, cfg.keep_init_if_worse)
            if name == "init":
                report.notes.append("the search mean scored worse than the local init: kept the init")
            return name, amax, score
        # the start candidates the search did not start from are candidates too: the start was
        # chosen on the search part, which a coarse metric on few samples can mislead
        rows = [("mean", mean, report.objective["final"], mean_selection),
                ("best_sample", search.best_amax, search.best_loss, search.best_selection),
                ("init", driver.init, driver.init_objective, None)]
        rows += [(f"start_{name}", amax, score, None) for name, amax, score in self.starts]
        kept = {r[0] for r in self._gated([(n, a, s) for n, a, s, _ in rows if a is not None], ctx)}
        rows = [r for r in rows if r[0] in kept]
        scored = []
        for name, amax, score, selection in rows:
            if amax is None:
                continue
            if ctx.selection_objective is not None:
                selection = ctx.evaluate_selection(amax)
            elif selection is None:  # the split objective scores both parts in one evaluation
                score, selection = ctx.evaluate(amax), ctx.evaluator.last_selection
            scored.append((name, amax, score, selection))
        report.selection = [{"name": n, "search": s, "selection": h} for n, _, s, h in scored]
        name, amax, _ = choose([(n, a, h) for n, a, _, h in scored], cfg.keep_init_if_worse)
        chosen = next(r for r in scored if r[0] == name)
        report.objective["chosen_selection"] = chosen[3]
        report.notes.append(f"selection guard: chose the {name} on the held-back part "
                            f"({chosen[3]:.4g}; search part {chosen[2]:.4g})")
        return name, amax, chosen[2]

    def _gated(self, rows, ctx):
        """The final candidates within the distance gate (all of them when the start had no gate)."""
        if not self.distances:
            return rows
        far = gate_by_distance(ctx, rows, self.config.distance_gate, self.distances, "final candidates")
        return [r for r in rows if r[0] not in far]

    def _start(self, ctx, fingerprint):
        t = time.perf_counter()
        init = local_init(ctx)
        ctx.report.timings["local_init"] = time.perf_counter() - t
        score, start = ctx.evaluate(init), "output_mse"
        if self.config.init == "best":
            candidates = [("output_mse", init, score)]
            for name in BASELINES:
                amax = ctx.baseline(name)
                value = ctx.evaluate(amax)
                ctx.report.objective[f"start_{name}"] = value
                candidates.append((name, amax, value))
            far = gate_by_distance(ctx, candidates, self.config.distance_gate, self.distances, "start candidates")
            candidates = [c for c in candidates if c[0] not in far]
            start, init, score = choose(candidates)  # ties: the earlier candidate, the output-MSE init first
            self.starts = [c for c in candidates if c[0] != start]
            self.distances = {("init" if n == start else f"start_{n}"): d for n, d in self.distances.items()}
            if start != "output_mse":
                ctx.report.notes.append(f"ESC started from the {start} scales (the best objective of the "
                                        + ("candidates within the distance gate)" if far else
                                           "candidates: better than the output-MSE init)"))
        driver = SearchDriver(ctx, init, score, fingerprint)
        # the guard weighs these after the search: a resumed run must see the same ones
        driver.calibrator_state = {
            "starts": [{"name": n, "amax": torch.from_numpy(np.asarray(a, dtype=np.float64)),
                        "score": np.nan if v is None else float(v)} for n, a, v in self.starts],
            "distances": {n: np.nan if d is None else float(d) for n, d in self.distances.items()}}
        driver.save()
        return driver

    def _restore(self, state):
        self.starts = [(s["name"], s["amax"].numpy(), None if np.isnan(s["score"]) else s["score"])
                       for s in state.get("starts", [])]
        self.distances = dict(state.get("distances", {}))

    @staticmethod
    def _check_finite(ctx):
        ev = ctx.evaluator
        if ev.count and ev.n_nonfinite == ev.count:
            raise ObjectiveError(
                f"the objective returned NaN or inf for all {ev.count} evaluations (the init, every CMA-ES "
                "candidate and the final mean): ESC had nothing to compare. Check it on the FP32 model and "
                "on a max-calibrated model (QuantConfig(method='max')); it must return a finite task error.")
        if ev.n_nonfinite:
            ctx.report.notes.append(f"WARNING: the objective was NaN/inf for {ev.n_nonfinite} of {ev.count} "
                                    "evaluations (counted as the worst value)")
