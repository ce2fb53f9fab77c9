"""The calibration pipeline: passes before calibration, statistics, calibrator, passes after.

Every step is looked up in the registries; nothing here branches on a
calibrator's or a pass's name.
"""
import time

import numpy as np

from .allocator import USER_TUNING, keep_freed_memory
from .batching import supports_batching
from .config import QuantConfig
from .context import CalibrationContext
from .coverage import build_coverage, trace_ops
from .distill import DistillObjective, OutputRecorder, describe_kinds
from .errors import CalibrationError, ConfigError
from .plan import check_not_quantized, insert_quantizers, observe
from .registry import get_calibrator, get_transform
from .report import LayerScales, QuantReport
from .state import state_digest


def check_inputs(model, config, forward_loop, objective):
    """Everything that can be checked before any work; returns (config, calibrator spec, passes)."""
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an esc_plugin.QuantConfig, got {type(config).__name__}.")
    spec = get_calibrator(config.method)
    if not callable(forward_loop):
        raise CalibrationError("forward_loop is required: a callable forward_loop(model) that runs "
                               "the calibration inputs through the model.")
    if objective is not None and not callable(objective):
        raise CalibrationError(f"objective must be a callable objective(model) -> float, got "
                               f"{type(objective).__name__}.")
    if spec.objective == "required" and not callable(objective):
        raise CalibrationError(f"method={config.method!r} needs an objective: a callable objective(model) -> "
                               "float returning the task error on the calibration samples (lower is better).")
    check_not_quantized(model)
    check_execution(config, objective, forward_loop)
    passes = [(get_transform(name), get_transform(name).cls(config)) for name in config.ptq]
    for tspec, transform in passes:
        check = getattr(transform, "check", None)
        if check is not None:
            check(model)  # raises a ConfigError naming the structure it needs
    return config, spec, passes


def check_execution(config, objective, forward_loop=None):
    """``executor`` / ``batch_candidates`` can serve this objective (Ray installed, the objective and loop
    picklable, the objective batchable)."""
    if config.executor == "ray":
        from .executors.ray_actors import check_picklable

        check_picklable(objective=objective, forward_loop=forward_loop)
    if config.batch_candidates > 1 and objective is not None and not supports_batching(objective):
        raise ConfigError(
            f"batch_candidates={config.batch_candidates} needs an objective that declares it can be batched "
            "(its model calls take batch-first inputs, return per-sample outputs and do not depend on earlier "
            "outputs; see esc_plugin.core.batching): set objective.supports_candidate_batching = True if so, "
            "pass no objective (the label-free distillation objective can), or use batch_candidates=1.")


def run_pipeline(model, config, forward_loop, objective, progress=True):
    config, spec, passes = check_inputs(model, config, forward_loop, objective)
    memory_note = _keep_freed_memory_note() if config.keep_freed_memory else None  # before the model copy
    t0 = time.perf_counter()
    digest = state_digest(model)
    qmodel, plan = insert_quantizers(model, config)
    report = QuantReport(config=config.to_dict())
    if memory_note:
        report.notes.append(memory_note)
    ctx = CalibrationContext(qmodel, plan, config, forward_loop, objective, report, progress)
    ctx.model_digest = digest
    report.timings["digest_and_copy"] = time.perf_counter() - t0

    applied = []
    for tspec, transform in passes:
        if tspec.stage == "before_calibration":
            applied.append(_apply(tspec, transform, ctx))
    _collect_statistics(ctx, spec)
    _choose_objective(ctx, spec)
    calibrator = spec.cls(config)
    t = time.perf_counter()
    final = np.asarray(calibrator.calibrate(ctx), dtype=np.float64)
    report.timings["calibrate"] = time.perf_counter() - t
    if final.shape != (len(ctx.sites),):
        raise CalibrationError(f"calibrator {spec.name!r} returned {final.shape} amax values for "
                               f"{len(ctx.sites)} active sites: it must return one per ctx.sites entry.")
    ctx.set_amax(final)
    for layer, value in zip(report.layers, final):
        layer.final = float(max(value, 1e-8))
    ctx.release_statistics()
    for tspec, transform in passes:
        if tspec.stage == "after_calibration":
            applied.append(_apply(tspec, transform, ctx))

    report.timings["n_evaluations"] = ctx.evaluator.count
    report.timings["seconds_per_evaluation"] = ctx.evaluator.seconds / max(ctx.evaluator.count, 1)
    report.timings["total"] = time.perf_counter() - t0
    qmodel.__dict__["esc_report"] = report
    qmodel.__dict__["esc_state"] = {
        "fp32_digest": digest,
        "calibrator": {"name": spec.name, "state": _state_of(calibrator)},
        "transforms": [{"name": name, "stage": stage, "state": state} for name, stage, state in applied],
    }
    return qmodel


def _keep_freed_memory_note():
    if keep_freed_memory():
        return "keep_freed_memory: in effect in this process (glibc malloc keeps freed heap memory)"
    return ("keep_freed_memory: not applied (not glibc, or the environment sets one of "
            f"{', '.join(USER_TUNING)}: that tuning is kept)")


def _apply(tspec, transform, ctx):
    t = time.perf_counter()
    transform.apply(ctx)
    seconds = time.perf_counter() - t
    ctx.report.ptq.append({"name": tspec.name, "stage": tspec.stage, "seconds": seconds})
    return tspec.name, tspec.stage, transform.state_dict()


def _state_of(obj):
    return obj.state_dict() if hasattr(obj, "state_dict") else {}


def _collect_statistics(ctx, spec):
    """Pass 1: FP32 max (+ input samples when the calibrator needs them) and the op trace."""
    t = time.perf_counter()
    config, plan = ctx.config, ctx.plan
    # FP32 outputs for the distillation objective come from this same pass (no extra pass)
    ctx.recorder = OutputRecorder(ctx.model) if _wants_distill(ctx, spec) else None
    try:
        with trace_ops(ctx.model) as tracer:
            ctx.observers = observe(plan, ctx.model, ctx.forward_loop, config.seed,
                                    sample_elements=config.init_max_elements if "samples" in spec.needs else 0,
                                    nan_policy=config.nan_policy)
    finally:
        if ctx.recorder is not None:
            ctx.recorder.close()
    _mark_unused(plan, ctx.observers)
    ctx.sites = plan.active_points()
    ctx.maxes = np.array([max(ctx.observers[p.name].amax, 0.0) for p in ctx.sites], dtype=np.float64)
    report = ctx.report
    report.coverage = build_coverage(ctx.model, ctx.sites, tracer, plan.excluded)
    for p in plan.points:
        if getattr(p, "unused", False):
            report.coverage.append({"name": p.name, "op": p.op, "quantized": False, "calls": 0,
                                    "reason": "never executed by forward_loop: left in float"})
    report.layers = [LayerScales(p.name, p.op, float(m)) for p, m in zip(ctx.sites, ctx.maxes)]
    nonfinite = {n: o.nonfinite for n, o in ctx.observers.items() if o.nonfinite}
    if nonfinite:
        report.notes.append(f"nan_policy='ignore': left out non-finite calibration values {nonfinite}")
    report.timings["statistics"] = time.perf_counter() - t
    if "histogram" in spec.needs:
        ctx.histograms()


def _wants_distill(ctx, spec):
    uses_objective = spec.objective != "none" or "fallback" in ctx.config.ptq
    # a calibrator that judges candidates by their distance to the FP32 outputs as well (ESC's gate)
    wants = getattr(spec.cls, "wants_fp32_distance", None)
    gate = ctx.has_objective and callable(wants) and wants(ctx.config)
    return uses_objective and (not ctx.has_objective or ctx.config.distill_weight > 0 or gate)


def _choose_objective(ctx, spec):
    """Label-free distillation when no objective is given; the selection guard's split."""
    config, report, user = ctx.config, ctx.report, ctx.objective
    split = config.selection_split
    if ctx.recorder is not None and callable(user) and not config.distill_weight > 0:
        _use_distance(ctx)  # only the label-free distance is wanted, beside the user's objective
    elif ctx.recorder is not None:
        holdout = split if split and not callable(user) else 0.0
        distill = DistillObjective(ctx.forward_loop, ctx.recorder.outputs, config.distill, holdout,
                                   ctx.recorder.heads)
        report.notes.append(f"objective: distillation to the FP32 outputs ({describe_kinds(distill.kinds)}"
                            f"{', inferred' if config.distill == 'auto' else ''})"
                            + ("" if not callable(user) else f" x {config.distill_weight} added to the "
                               "given objective"))
        ctx.use_objective(distill if not callable(user) else _Sum(user, distill, config.distill_weight))
        if callable(user):
            ctx.distance = distill  # held nothing back: its value is over every calibration sample
        ctx.recorder = None
    if split and callable(getattr(user, "split", None)):
        search, select = user.split(split)
        if callable(ctx.objective) and ctx.objective is not user:  # distillation added on top
            search = _Sum(search, ctx.objective.distill, config.distill_weight)
        ctx.use_objective(search, select)
        held = getattr(user, "held_back", None)
        report.notes.append(f"selection guard: the objective's split ({split:.0%} held back"
                            + (f": {held})" if held else ")"))
    elif split and getattr(ctx.objective, "splits", False):
        report.notes.append(f"selection guard: {split:.0%} of the calibration samples held back")
    elif split and spec.objective != "none" and ctx.has_objective:
        report.notes.append("selection guard off: the objective cannot be split (give it a split(fraction) "
                            "method, or pass no objective for the label-free distillation objective)")


def _use_distance(ctx):
    """The distillation distance to the FP32 outputs as ``ctx.distance`` (not the objective)."""
    recorder, ctx.recorder = ctx.recorder, None
    try:
        ctx.distance = DistillObjective(ctx.forward_loop, recorder.outputs, ctx.config.distill, 0.0,
                                        recorder.heads)
    except CalibrationError as exc:  # e.g. outputs that are not tensors: judge on the objective alone
        ctx.report.notes.append(f"distance gate off: {exc}")


class _Sum:
    """``objective + weight * distill`` (user objective combined with distillation)."""

    def __init__(self, objective, distill, weight):
        self.objective, self.distill, self.weight = objective, distill, weight
        self.last_selection = None
        self.supports_candidate_batching = supports_batching(objective) and supports_batching(distill)

    def __call__(self, model):
        return float(self.objective(model)) + self.weight * self.distill(model)


def _mark_unused(plan, observers):
    if not any(o.calls for o in observers.values()):
        raise CalibrationError(
            "forward_loop ran no input through the model's quantized ops: it must call the "
            "model (the one passed in) on the calibration batches, e.g. `for x in batches: model(x)`."
        )
    for p in plan.points:
        if not observers.get(p.name) or not observers[p.name].calls:
            p.unused = True
            p.input_quantizer.disable()
