"""``quantize: esc`` as a stage of a SpeechBrain recipe.

The recipe adds one line after its usual test evaluation::

    quantize_brain(brain, hparams, calib_set=valid_data, test_set=test_data,
                   loader_kwargs=hparams["test_dataloader_opts"])

and ``quantize: esc`` (or max / percentile / entropy / mse / none) plus an
optional ``quantization:`` block to its YAML. The Brain's own dataloader,
``compute_forward``, ``compute_objectives`` and ``MetricStats`` do the work:
the calibration objective *is* the recipe's metric on the first
``n_samples`` calibration items.
"""
import contextlib
import os
from dataclasses import dataclass, field

import torch
import speechbrain as sb

from ..core.errors import CalibrationError, ConfigError
from ..core.io import write_json
from ..core.selection import SplitObjective
from .binding import bound_modules
from .frontcache import FrontEndCache
from .metric import LOSS, choose_tracker, fp32_lacks_test_metrics, read_value, resolve_direction
from .outputs import check_output_folder, redirect_outputs, restore_outputs
from .saved import save_quantized
from .settings import read_settings

TEST = sb.Stage.TEST


@dataclass
class StageResult:
    """What the stage produced.

    Attributes
    ----------
    folder : str
        Where the quantized model, report and metrics were written.
    modules : torch.nn.Module
        The quantized copy of ``brain.modules`` (for a peer quantizer, e.g.
        ``quantize: nncf``, the peer's quantized copy).
    report : esc_plugin.QuantReport or None
        None for a peer quantizer.
    metrics : dict
        ``fp32`` and ``quantized`` test metrics (``brain.test_stats`` and the
        optimised tracker's value), and the calibration objective of both.
    """

    folder: str
    modules: torch.nn.Module
    report: object
    metrics: dict = field(default_factory=dict)
    peer: bool = False

    @contextlib.contextmanager
    def applied(self, brain):
        """Run ``brain`` with the quantized modules inside the block."""
        with bound_modules(brain, self.modules):
            yield brain


def quantize_brain(brain, hparams, calib_set, test_set=None, loader_kwargs=None, progress=True,
                   calib_loader_kwargs=None):
    """Calibrate ``brain.modules`` with the recipe's own metric; evaluate and save the result.

    Does nothing (returns ``None``) when ``hparams["quantize"]`` is ``none`` or
    absent. The Brain keeps its FP32 modules afterwards; the quantized ones are
    in the returned :class:`StageResult` and in ``quantization.output_folder``.

    Arguments
    ---------
    brain : speechbrain.core.Brain
        A trained Brain (FP32 checkpoint loaded). Its ``on_stage_start(TEST)``
        must create the MetricStats that ``compute_objectives`` fills.
    hparams : dict
        The recipe's hparams with ``quantize`` and ``quantization``.
    calib_set : Dataset
        Calibration data; its first ``quantization.n_samples`` items are used.
    test_set : Dataset, optional
        Evaluated with the quantized modules through ``brain.evaluate``.
    loader_kwargs : dict, optional
        Dataloader options (batch size, collate) for both sets.
    progress : bool
        tqdm progress bars.
    calib_loader_kwargs : dict, optional
        Dataloader options for the calibration set only (default:
        ``loader_kwargs``). The selection guard holds back whole batches, so
        a calibration set that fits in one batch gets no guard: give it a
        smaller ``batch_size`` here (e.g. ``n_samples / 5``).

    Returns
    -------
    StageResult or None
    """
    settings = read_settings(hparams)
    if settings is None:
        return None
    cfg, folder = settings.config, settings.output_folder
    check_output_folder(brain, hparams, settings)  # first: nothing may touch an FP32 file
    # modelopt (behind core.api) takes ~15 s to import: only pay it when quantizing.
    from ..core.api import quantize
    n = cfg.n_samples
    if len(calib_set) < n:
        raise ConfigError(f"the calibration set has {len(calib_set)} items but quantization.n_samples={n}: "
                          f"pass a larger calib_set or set `quantization: {{n_samples: {len(calib_set)}}}`.")
    loader_kwargs = dict(loader_kwargs or {})
    calib_kwargs = loader_kwargs if calib_loader_kwargs is None else dict(calib_loader_kwargs)
    batches = _calibration_batches(brain, calib_set, n, calib_kwargs)

    # Which metric is the objective, and its direction, checked before any calibration work.
    brain.modules.eval()
    brain.on_stage_start(TEST, epoch=None)
    metric_name, notes = choose_tracker(brain, settings.metric)
    hib = settings.higher_is_better
    if metric_name != LOSS:
        hib, note = resolve_direction(metric_name, getattr(brain, metric_name), settings.metric_key, hib)
        notes += [note] if note else []
    objective_spec = (metric_name, settings.metric_key, hib)

    cache = FrontEndCache(brain, cfg.exclude) if settings.cache_front_end else None

    def run_batches(modules, indices=None):
        with bound_modules(brain, modules), torch.no_grad(), \
                (cache.applied(brain, modules) if cache else contextlib.nullcontext()):
            brain.on_stage_start(TEST, epoch=None)
            losses = []
            for i, b in enumerate(batches):
                if indices is not None and i not in indices:
                    continue
                if cache:
                    cache.start_batch(i)
                losses.append(float(brain.evaluate_batch(b, stage=TEST)))
        return losses

    def forward_loop(modules):
        run_batches(modules)

    def objective_on(modules, indices=None):
        losses = run_batches(modules, indices)
        if metric_name == LOSS:
            return sum(losses) / len(losses)
        return read_value(getattr(brain, metric_name), settings.metric_key, hib)

    # split by batch for the core's selection guard (every k-th batch held back; the batch sizes make
    # sure a short last batch is not all that is held back)
    objective = SplitObjective(objective_on, len(batches), sizes=[_batch_size(b) for b in batches])

    fp32_objective = objective(brain.modules)  # also records the front-end cache
    if cache:
        cache.recording = False
    if settings.peer:  # another project's quantizer, evaluated exactly like the calibrators
        from .peers import run_peer_stage
        qmodel, metrics = run_peer_stage(
            brain, settings, batches, forward_loop, objective, fp32_objective,
            lambda modules, out: _evaluate(brain, modules, test_set, loader_kwargs, out, objective_spec),
            _float_dict(brain.__dict__.get("test_stats")), test_set, notes)
        return StageResult(folder, qmodel, None, metrics, peer=True)
    # objective: distill -> no objective: the core distils to the FP32 outputs of the modules
    # compute_forward calls (no labels needed); the recipe's metric is still reported below.
    search_objective = None if settings.objective == "distill" else objective
    qmodules = quantize(brain.modules, cfg, forward_loop=forward_loop, objective=search_objective,
                        progress=progress)
    report = qmodules.esc_report
    report.objective.setdefault("fp32", fp32_objective)
    report.notes.append(f"calibration: first {n} items of calib_set; objective: {metric_name}"
                        + (f"[{settings.metric_key}]" if settings.metric_key else ""))
    report.notes.extend(notes + ([cache.note()] if cache else []))
    if len(batches) < 2 and any(note.startswith("selection guard off") for note in report.notes):
        report.notes.append(f"the {n} calibration items are one batch and the guard holds back whole batches: "
                            "pass calib_loader_kwargs={'batch_size': ...} to quantize_brain with a smaller "
                            "batch size (e.g. n_samples / 5)")

    save_quantized(qmodules, folder)
    metrics = {"method": settings.method, "label": settings.tag,
               "bits": f"W{cfg.weight_bits}A{cfg.act_bits}", "objective_name": metric_name,
               "higher_is_better": hib, "notes": notes,
               "calibration_objective": {"fp32": fp32_objective, "quantized": (
                   report.objective["chosen"] if "chosen" in report.objective and search_objective is not None
                   else objective(qmodules))},
               "fp32": _float_dict(brain.__dict__.get("test_stats")), "quantized": None,
               "seconds": report.timings.get("total")}
    if test_set is not None:
        metrics["quantized"] = _evaluate(brain, qmodules, test_set, loader_kwargs, folder, objective_spec)
        if fp32_lacks_test_metrics(metrics):
            # The recipe's Brain keeps no test_stats (SpeechBrain's templates only log them), or they
            # lack the objective tracker's value that the quantized row reports: evaluate the FP32
            # modules too, its outputs also kept out of the FP32 run's files.
            metrics["fp32"] = _evaluate(brain, brain.modules, test_set, loader_kwargs,
                                        os.path.join(folder, "fp32_test"), objective_spec)
    write_json(os.path.join(folder, "metrics.json"), metrics)
    return StageResult(folder, qmodules, report, metrics)


# ------------------------------------------------------------------ internals

def _calibration_batches(brain, calib_set, n, loader_kwargs):
    """The first ``n`` items, batched once and kept: data loading does not depend on the scales."""
    if hasattr(calib_set, "filtered_sorted"):
        subset = calib_set.filtered_sorted(select_n=n)
    else:
        subset = torch.utils.data.Subset(calib_set, range(n))
    kwargs = {k: v for k, v in loader_kwargs.items() if k != "ckpt_prefix"}
    kwargs["shuffle"] = False
    loader = brain.make_dataloader(subset, TEST, ckpt_prefix=None, **kwargs)
    # On the device once: the recipe's own ``batch.to(self.device)`` is then a no-op per evaluation.
    batches = [b.to(brain.device) if hasattr(b, "to") else b for b in loader]
    if not batches:
        raise CalibrationError("the calibration loader produced no batch: check calib_set and loader_kwargs.")
    return batches


def _evaluate(brain, modules, test_set, loader_kwargs, folder, objective_spec):
    """``brain.evaluate`` with ``modules``; its log and files go to ``folder``. Returns the test
    stats the recipe logged (or kept in ``test_stats``) and the objective tracker's value."""
    metric_name, key, hib = objective_spec
    saved, logger = redirect_outputs(brain, folder)
    missing = object()
    before = brain.__dict__.get("test_stats", missing)
    try:
        with bound_modules(brain, modules):
            # No checkpoint recovery: on_evaluate_start would reload FP32 weights into the
            # original modules only (harmless), but we skip it so nothing touches the FP32 files.
            with _no_recovery(brain):
                loss = brain.evaluate(test_set, test_loader_kwargs=dict(loader_kwargs), progressbar=None)
            after = brain.__dict__.get("test_stats", missing)
            stats = after if after is not missing and after is not before else \
                (logger.test_stats if logger is not None else None)
            result = _float_dict(stats) or {}
            if "loss" not in result and loss is not None:
                result["loss"] = float(loss)
            if metric_name != LOSS:
                result[f"{metric_name}_objective"] = read_value(getattr(brain, metric_name), key, hib)
    finally:
        restore_outputs(brain, saved)
        if before is missing:
            brain.__dict__.pop("test_stats", None)
        else:
            brain.test_stats = before
    return result


@contextlib.contextmanager
def _no_recovery(brain):
    original = brain.on_evaluate_start
    brain.on_evaluate_start = lambda max_key=None, min_key=None: None
    try:
        yield
    finally:
        brain.on_evaluate_start = original


def _float_dict(stats):
    if not isinstance(stats, dict):
        return None
    out = {}
    for k, v in stats.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _batch_size(batch):
    """Samples in a calibration batch (a SpeechBrain ``PaddedBatch``, or anything with a length)."""
    size = getattr(batch, "batchsize", None)
    if size is None:
        try:
            size = len(batch)
        except TypeError:
            size = 1
    return size
