"""Public entry points: ``quantize``, ``save``, ``load``.

Modelled on ModelOpt's ``mtq.quantize(model, cfg, forward_loop)``: the caller
hands a forward loop over calibration data (and, for ESC, an objective); the
library owns the quantizers.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import add_attention_site, attention_sites
from .config import QuantConfig
from .coverage import build_coverage, trace_ops
from .errors import CalibrationError, ConfigError, ObjectiveError
from .histogram import entropy_amax, mse_amax, percentile_amax
from .io import torch_save, write_bytes
from .local_init import search_layer_amax
from .plan import insert_quantizers, observe
from .report import LayerScales, QuantReport
from .search import WORST_LOSS, ScaleSearch

FORMAT = "esc_plugin.quantized/1"


def quantize(model, config=None, forward_loop=None, objective=None, *, progress=True):
    """Return a quantized copy of ``model``; the FP32 model is untouched.

    Arguments
    ---------
    model : torch.nn.Module
        The FP32 model.
    config : QuantConfig
        Bits and calibrator (default: W8A8 ESC).
    forward_loop : callable
        ``forward_loop(model)`` runs the calibration inputs through ``model``.
    objective : callable
        ``objective(model) -> float``: task error on the calibration samples,
        lower is better. Required by ``esc``; ``percentile`` uses it to pick
        the best percentile; the other baselines ignore it.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    torch.nn.Module
        The quantized copy, with ``.esc_report`` (a :class:`QuantReport`).

    Example
    -------
    >>> import torch, esc_plugin as esc
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> data = [torch.randn(4, 8) for _ in range(3)]
    >>> def loop(m):
    ...     for x in data: m(x)
    >>> def error(m):
    ...     return sum(float(((m(x) - model(x)) ** 2).mean()) for x in data)
    >>> q = esc.quantize(model, esc.QuantConfig(bits=8, budget=8), loop, error, progress=False)
    >>> len(q.esc_report.quantized_ops)
    2
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an esc_plugin.QuantConfig, got {type(config).__name__}.")
    if not callable(forward_loop):
        raise CalibrationError("forward_loop is required: a callable forward_loop(model) that runs "
                               "the calibration inputs through the model.")
    if config.method == "esc" and not callable(objective):
        raise CalibrationError("method='esc' needs an objective: a callable objective(model) -> float "
                               "returning the task error on the calibration samples (lower is better).")
    t0 = time.perf_counter()
    qmodel, plan = insert_quantizers(model, config)
    report = QuantReport(config=config.to_dict())

    # Pass 1: FP32 max (+ ESC input samples), and the op trace for the coverage report.
    with trace_ops(qmodel) as tracer:
        obs = observe(plan, qmodel, forward_loop, config.seed,
                      sample_elements=config.init_max_elements if config.method == "esc" else 0)
    _check_executed(plan, obs, report)
    points = plan.active_points()
    report.coverage = build_coverage(qmodel, points, tracer, plan.excluded)
    for p in plan.points:
        if getattr(p, "unused", False):
            report.coverage.append({"name": p.name, "op": p.op, "quantized": False, "calls": 0,
                                    "reason": "never executed by forward_loop: left in float"})
    maxes = np.array([max(obs[p.name].amax, 0.0) for p in points])
    report.layers = [LayerScales(p.name, p.op, float(m)) for p, m in zip(points, maxes)]
    report.timings["statistics"] = time.perf_counter() - t0
    evaluate = _Evaluator(objective, qmodel, plan, report)

    if config.method == "max":
        final = maxes
    elif config.method in ("entropy", "mse", "percentile"):
        hobs = _histograms(plan, qmodel, forward_loop, config, points, maxes)
        final = _histogram_method(config, config.method, points, hobs, maxes, evaluate, report)
    else:
        baselines = {}
        if config.init == "best":
            # ESC composed with the baselines: their scales are extra starting candidates.
            hobs = _histograms(plan, qmodel, forward_loop, config, points, maxes)
            baselines = {"max": maxes}
            for name in ("percentile", "entropy", "mse"):
                baselines[name] = _histogram_method(config, name, points, hobs, maxes, evaluate, report)
            del hobs
        final = _esc(config, points, obs, maxes, evaluate, report, progress, baselines)
    del obs
    plan.set_act_amax(final)
    for layer, value in zip(report.layers, final):
        layer.final = float(max(value, 1e-8))
    report.timings["total"] = time.perf_counter() - t0
    qmodel.__dict__["esc_report"] = report
    return qmodel


def _check_executed(plan, obs, report):
    if not any(o.calls for o in obs.values()):
        raise CalibrationError(
            "forward_loop ran no input through the model's quantized ops: it must call the "
            "model (the one passed in) on the calibration batches, e.g. `for x in batches: model(x)`."
        )
    for p in plan.points:
        if not obs.get(p.name) or not obs[p.name].calls:
            p.unused = True
            p.input_quantizer.disable()


class _Evaluator:
    """Calls the user's objective for a vector of activation amax values."""

    def __init__(self, objective, qmodel, plan, report):
        self.objective, self.qmodel, self.plan, self.report = objective, qmodel, plan, report
        self.count, self.seconds = 0, 0.0

    def __call__(self, amax):
        if not callable(self.objective):
            return None
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
        return value if math.isfinite(value) else WORST_LOSS


def _histograms(plan, qmodel, forward_loop, config, points, maxes):
    return observe(plan, qmodel, forward_loop, config.seed, bins=config.histogram_bins,
                   hist_ranges={p.name: float(m) for p, m in zip(points, maxes) if m > 0})


def _histogram_method(config, method, points, hobs, maxes, evaluate, report):
    def per_layer(fn):
        out = []
        for p, m in zip(points, maxes):
            o = hobs.get(p.name)
            out.append(fn(o.hist.numpy(), o.edges) if o is not None and o.hist is not None and m > 0 else m)
        return np.array(out)

    bits = config.act_bits
    if method == "entropy":
        return per_layer(lambda h, e: entropy_amax(h, e, bits))
    if method == "mse":
        return per_layer(lambda h, e: mse_amax(h, e, bits))
    candidates = {pc: per_layer(lambda h, e, pc=pc: percentile_amax(h, e, pc)) for pc in config.percentiles}
    scores = {pc: evaluate(a) for pc, a in candidates.items()}
    if any(v is None for v in scores.values()):
        best = config.percentiles[0]
        report.notes.append(f"percentile: no objective given, used {best} without selection")
    else:
        best = min(scores, key=scores.get)
        report.objective.update({f"percentile_{pc}": v for pc, v in scores.items()})
    report.notes.append(f"percentile: chose {best}")
    return candidates[best]


def _esc(config, points, obs, maxes, evaluate, report, progress, baselines):
    names = [p.name for p in points]
    fingerprint = hashlib.sha256(json.dumps(
        [{k: v for k, v in config.to_dict().items() if k != "checkpoint"}, names], default=str
    ).encode()).hexdigest()
    search, init = None, None
    if config.checkpoint and os.path.exists(config.checkpoint):
        state = torch.load(config.checkpoint, weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"checkpoint {config.checkpoint} belongs to another run (different config or model): "
                "delete it or point QuantConfig.checkpoint to a new file."
            )
        search, init = ScaleSearch.from_bytes(state["search"]), np.asarray(state["init"])
        report.objective["init"] = state["init_objective"]
        report.notes.append(f"resumed from {config.checkpoint} at generation {search.generation}")

    t = time.perf_counter()
    if init is None:
        init = np.empty(len(points))
        bar = tqdm(list(zip(points, maxes)), desc="ESC local init (output MSE)", disable=not progress)
        for i, (p, m) in enumerate(bar):
            init[i], _ = search_layer_amax(p, obs[p.name].inputs(), float(m), config.act_bits, config.init_grid)
    report.timings["local_init"] = time.perf_counter() - t
    for layer, value in zip(report.layers, init):
        layer.init = float(value)

    t = time.perf_counter()
    if search is None:
        report.objective["init"] = evaluate(init)
        start = "output_mse"
        for name, amax in baselines.items():
            score = evaluate(amax)
            report.objective[f"start_{name}"] = score
            if score < report.objective["init"]:
                init, report.objective["init"], start = np.asarray(amax, dtype=np.float64), score, name
        if start != "output_mse":
            report.notes.append(f"ESC started from the {start} scales (better objective than the output-MSE init)")
        for layer, value in zip(report.layers, init):
            layer.init = float(value)
        search = ScaleSearch(init, config.sigma0, config.budget, config.popsize, config.seed,
                             max_amax=maxes, space=config.search_space)
        _checkpoint(config, fingerprint, search, init, report)
    bar = tqdm(total=search.generations * search.popsize, initial=search.evaluations,
               desc="ESC CMA-ES", disable=not progress)
    while not search.done:
        candidates = search.ask()
        losses = []
        for c in candidates:
            losses.append(evaluate(c))
            bar.update(1)
        search.tell(candidates, losses)
        bar.set_postfix(best=f"{min(h['loss'] for h in search.history):.4g}")
        _checkpoint(config, fingerprint, search, init, report)
    bar.close()
    final = search.mean_amax()
    report.objective["final"] = evaluate(final)
    report.history = search.history
    if config.keep_init_if_worse and report.objective["final"] > report.objective["init"]:
        report.notes.append("the search mean scored worse than the local init: kept the init")
        final = init
    report.objective["chosen"] = min(report.objective["final"], report.objective["init"]) \
        if config.keep_init_if_worse else report.objective["final"]
    report.timings["search"] = time.perf_counter() - t
    report.timings["n_evaluations"] = evaluate.count
    report.timings["seconds_per_evaluation"] = evaluate.seconds / max(evaluate.count, 1)
    return final


def _checkpoint(config, fingerprint, search, init, report):
    if config.checkpoint:
        torch_save(config.checkpoint, {"fingerprint": fingerprint, "search": search.state_bytes(),
                                       "init": np.asarray(init), "init_objective": report.objective["init"]})


# ------------------------------------------------------------------- save / load

def _weights_fingerprint(plan):
    total = 0.0
    for p in plan.points:
        for _, w in p.module.named_parameters(recurse=False):
            total += float(w.detach().double().abs().sum())
    return total


def save(qmodel, path):
    """Save the quantization state (config, scales, call sites, report) of ``qmodel``.

    The weights are not stored: ``load`` applies the state to the FP32 model,
    so the FP32 checkpoint stays the single source of weights. The file is
    written atomically.
    """
    plan = _plan_of(qmodel)
    sites = []
    for name, module in qmodel.named_modules():
        for site in getattr(module, "esc_sites", []):
            sites.append((name,) + tuple(site))
    state = {
        "format": FORMAT,
        "config": plan.config.to_dict(),
        "amax": {p.name: (float(p.input_quantizer.amax) if p.input_quantizer.is_enabled else None)
                 for p in plan.points},
        "sites": sites,
        "attention_sites": attention_sites(qmodel),
        "weights_fingerprint": _weights_fingerprint(plan),
        "report": qmodel.esc_report.to_dict() if hasattr(qmodel, "esc_report") else None,
    }
    torch_save(path, state)
    return path


def load(model, path):
    """Rebuild the quantized model from the FP32 ``model`` and a file written by :func:`save`."""
    state = torch.load(path, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an esc_plugin quantization file (written by esc.save).")
    config = QuantConfig.from_dict(state["config"])
    qmodel, plan = insert_quantizers(model, config)
    modules = dict(qmodel.named_modules())
    for name, pname, key, size, stride, offset in state["sites"]:
        modules[name].esc_add_site(pname, key, tuple(size), tuple(stride), offset)
    for name in state.get("attention_sites", []):
        add_attention_site(modules[name], name, plan)
    by_name = {p.name: p for p in plan.points}
    missing = sorted(set(state["amax"]) ^ set(by_name))
    if missing:
        raise ConfigError(f"{path} does not match this model (quantized ops differ: {missing[:5]}...). "
                          "Load it onto the same FP32 model architecture it was calibrated on.")
    fp = _weights_fingerprint(plan)
    if not math.isclose(fp, state["weights_fingerprint"], rel_tol=1e-6):
        raise ConfigError(f"{path} was calibrated on different weights: load it onto the FP32 "
                          "checkpoint it was made from.")
    for name, amax in state["amax"].items():
        if amax is None:
            by_name[name].unused = True
            by_name[name].input_quantizer.disable()
        else:
            by_name[name].input_quantizer.set_amax(amax)
    if state.get("report"):
        qmodel.__dict__["esc_report"] = QuantReport.from_dict(state["report"])
    return qmodel


def _plan_of(qmodel):
    plan = qmodel.__dict__.get("esc_plan")
    if plan is None:
        raise CalibrationError("this model was never quantized: call esc.quantize(model, config, "
                               "forward_loop, objective) first and pass its result.")
    return plan


def report_of(qmodel):
    return _plan_of(qmodel) and qmodel.esc_report


def write_bytes_atomic(path, data):  # re-exported for integrations
    write_bytes(path, data)
