"""ESC step 2 driver: the ask/evaluate/tell loop, progress and resumable checkpoints.

The optimizer (:class:`~esc_plugin.core.search.ScaleSearch`) never calls the
objective; this loop hands each generation's candidates to the executor
``QuantConfig(executor=...)`` names (:mod:`esc_plugin.core.executors`: in
this process, or on Ray actors; optionally ``batch_candidates`` per forward
pass) and tells CMA-ES their losses in candidate order, so the scales do not
depend on where or how many at a time they were evaluated.

Checkpoints hold plain arrays only (the init, every generation's candidates
and losses, and the calibrator's start candidates), never pickled objects: resuming rebuilds the search
from its seed and replays the recorded generations, which reproduces the
uninterrupted run's state exactly (CMA-ES is deterministic given its seed and
the losses it is told), and loading a checkpoint cannot run code.
"""
import hashlib
import json
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .executors import make_executor
from .io import torch_save
from .search import ScaleSearch
from .state import read_state_file

CHECKPOINT_FORMAT = "esc_plugin.cma_checkpoint/2"
# Options that do not change the answer: a run may resume with another executor or worker count.
NOT_IN_FINGERPRINT = ("checkpoint", "executor", "workers", "num_gpus_per_worker", "keep_freed_memory")


def run_fingerprint(config, site_names, model_digest, maxes):
    """Identifies a run: config (less the checkpoint path), sites, FP32 weights and calibration data.

    The data enters through the FP32 max |x| of every site (rounded, so
    bit-level noise of threaded kernels does not matter); other calibration
    data gives other maxima.
    """
    data = [float(f"{m:.5e}") for m in np.asarray(maxes, dtype=np.float64)]
    payload = [{k: v for k, v in config.to_dict().items() if k not in NOT_IN_FINGERPRINT}, list(site_names),
               model_digest, data]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()


class SearchDriver:
    """Runs CMA-ES from ``init`` on ``ctx.evaluate``; writes/resumes ``config.checkpoint``."""

    def __init__(self, ctx, init, init_objective, fingerprint):
        self.ctx, self.config = ctx, ctx.config
        self.init = np.asarray(init, dtype=np.float64)
        self.init_objective = init_objective
        self.fingerprint = fingerprint
        self.generations = []  # [{"candidates": (k, N) array, "losses": (k,) array}]
        self.calibrator_state = {}  # plain tensors / numbers the calibrator needs after the search

    def new_search(self):
        c = self.config
        return ScaleSearch(self.init, c.sigma0, c.budget, c.popsize, c.seed,
                           max_amax=self.ctx.maxes, space=c.search_space, restarts=c.restarts)

    def run(self):
        search = self.new_search()
        self._replay(search, self.generations)
        bar = tqdm(total=search.budget, initial=search.evaluations, desc="ESC CMA-ES",
                   disable=not self.ctx.progress)
        timings = self.ctx.report.timings
        t = time.perf_counter()
        executor = make_executor(self.ctx) if not search.done else None
        timings["executor_start"] = time.perf_counter() - t  # e.g. Ray actors receiving the model
        timings.setdefault("search_evaluation_seconds", 0.0)  # summed over workers: > wall time when parallel
        t = time.perf_counter()
        try:
            while not search.done:
                candidates = search.ask()
                evaluations = executor.evaluate(candidates, progress=bar.update)
                timings["search_evaluation_seconds"] += sum(e.seconds for e in evaluations)
                losses = [e.loss for e in evaluations]
                selections = [e.selection for e in evaluations]
                search.tell(candidates, losses, selections)
                self.generations.append({"candidates": np.stack(candidates), "losses": np.asarray(losses),
                                         "selections": _nan_for_none(selections)})
                bar.set_postfix(best=f"{search.best_loss:.4g}")
                self.save()
        finally:
            # the generations alone (wall): what the executor parallelises, without its start or close
            timings["search_generations"] = timings.get("search_generations", 0.0) + time.perf_counter() - t
            if executor is not None:
                executor.close()
            bar.close()
        return search

    def _replay(self, search, generations):
        for g, gen in enumerate(generations):
            candidates = search.ask()
            stored = np.asarray(gen["candidates"], dtype=np.float64)
            if stored.shape != np.shape(candidates) or not np.array_equal(stored, np.stack(candidates)):
                raise ConfigError(
                    f"checkpoint {self.config.checkpoint}: generation {g} does not replay to the same "
                    "candidates (written by another esc_plugin / cma version?): delete it to start over.")
            selections = gen.get("selections")
            search.tell(candidates, [float(v) for v in gen["losses"]],
                        None if selections is None else [None if np.isnan(v) else float(v) for v in selections])

    # ------------------------------------------------------------ checkpoint file

    def save(self):
        if not self.config.checkpoint:
            return
        torch_save(self.config.checkpoint, {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
            "init": torch.from_numpy(self.init), "init_objective": float(self.init_objective),
            "generations": [{"candidates": torch.from_numpy(g["candidates"]),
                             "losses": torch.from_numpy(np.asarray(g["losses"], dtype=np.float64)),
                             "selections": torch.from_numpy(np.asarray(g["selections"], dtype=np.float64))}
                            for g in self.generations],
            "calibrator": self.calibrator_state})

    @classmethod
    def resume(cls, ctx, fingerprint):
        """A driver restored from ``ctx.config.checkpoint``, or None when there is none to resume."""
        path = ctx.config.checkpoint
        state = read_state_file(path, "CMA-ES checkpoint", missing_ok=True)
        if state is None:
            return None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not an esc_plugin CMA-ES checkpoint of this version "
                              f"(format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}): delete it "
                              "or point QuantConfig.checkpoint to a new file.")
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"checkpoint {path} belongs to another run (different config, FP32 weights or calibration "
                "data): delete it or point QuantConfig.checkpoint to a new file.")
        driver = cls(ctx, state["init"].numpy(), state["init_objective"], fingerprint)
        driver.generations = [{"candidates": g["candidates"].numpy(), "losses": g["losses"].numpy(),
                               "selections": g["selections"].numpy()} for g in state["generations"]]
        driver.calibrator_state = state.get("calibrator", {})
        return driver


def _nan_for_none(values):
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
