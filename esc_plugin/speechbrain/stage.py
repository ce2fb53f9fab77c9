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
import hashlib
import os
from dataclasses import dataclass, field

import torch
import speechbrain as sb
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.train_logger import FileTrainLogger

from ..core.errors import CalibrationError, ConfigError
from ..core.io import write_json
from .binding import bound_modules
from .metric import LOSS, check_direction, choose_tracker, read_value
from .settings import read_settings

TEST = sb.Stage.TEST


@dataclass
class StageResult:
    """What the stage produced.

    Attributes
    ----------
    folder : str
        Where the quantized model, report and metrics were written.
    modules : torch.nn.ModuleDict
        The quantized copy of ``brain.modules``.
    report : esc_plugin.QuantReport
    metrics : dict
        ``fp32`` and ``quantized`` test metrics (``brain.test_stats`` and the
        optimised tracker's value), and the calibration objective of both.
    """

    folder: str
    modules: torch.nn.Module
    report: object
    metrics: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def applied(self, brain):
        """Run ``brain`` with the quantized modules inside the block."""
        with bound_modules(brain, self.modules):
            yield brain


def quantize_brain(brain, hparams, calib_set, test_set=None, loader_kwargs=None, progress=True):
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

    Returns
    -------
    StageResult or None
    """
    settings = read_settings(hparams)
    if settings is None:
        return None
    # modelopt (behind core.api) takes ~15 s to import: only pay it when quantizing.
    from ..core.api import quantize
    cfg, folder = settings.config, settings.output_folder
    _check_output_folder(brain, folder)
    n = cfg.n_samples
    if len(calib_set) < n:
        raise ConfigError(f"the calibration set has {len(calib_set)} items but quantization.n_samples={n}: "
                          f"pass a larger calib_set or set `quantization: {{n_samples: {len(calib_set)}}}`.")
    loader_kwargs = dict(loader_kwargs or {})
    batches = _calibration_batches(brain, calib_set, n, loader_kwargs)

    # Which metric is the objective, checked before any calibration work.
    brain.modules.eval()
    brain.on_stage_start(TEST, epoch=None)
    metric_name = choose_tracker(brain, settings.metric)
    if metric_name != LOSS:
        check_direction(getattr(brain, metric_name), settings.metric_key, settings.higher_is_better)

    def run_batches(modules):
        with bound_modules(brain, modules), torch.no_grad():
            brain.on_stage_start(TEST, epoch=None)
            losses = [float(brain.evaluate_batch(b, stage=TEST)) for b in batches]
        return losses

    def forward_loop(modules):
        run_batches(modules)

    def objective(modules):
        losses = run_batches(modules)
        if metric_name == LOSS:
            return sum(losses) / len(losses)
        return read_value(getattr(brain, metric_name), settings.metric_key, settings.higher_is_better)

    fp32_stats = _float_dict(getattr(brain, "test_stats", None))
    fp32_objective = objective(brain.modules)
    qmodules = quantize(brain.modules, cfg, forward_loop=forward_loop, objective=objective, progress=progress)
    report = qmodules.esc_report
    report.objective.setdefault("fp32", fp32_objective)
    report.notes.append(f"calibration: first {n} items of calib_set; objective: {metric_name}"
                        + (f"[{settings.metric_key}]" if settings.metric_key else ""))

    save_quantized(qmodules, folder)
    metrics = {"method": settings.method, "bits": f"W{cfg.weight_bits}A{cfg.act_bits}",
               "objective_name": metric_name,
               "calibration_objective": {"fp32": fp32_objective, "quantized": (
                   report.objective["chosen"] if "chosen" in report.objective else objective(qmodules))},
               "fp32": fp32_stats, "quantized": None,
               "seconds": report.timings.get("total")}
    if test_set is not None:
        metrics["quantized"] = _evaluate(brain, qmodules, test_set, loader_kwargs, folder, metric_name,
                                         settings)
    write_json(os.path.join(folder, "metrics.json"), metrics)
    return StageResult(folder, qmodules, report, metrics)


def save_quantized(qmodules, folder):
    """Write ``quantized.pt`` (esc state), a SpeechBrain checkpoint of the quantized modules,
    ``report.json`` and the plots into ``folder``."""
    from ..core.api import save as esc_save
    os.makedirs(folder, exist_ok=True)
    esc_save(qmodules, os.path.join(folder, "quantized.pt"))
    ckpt = Checkpointer(os.path.join(folder, "checkpoint"), recoverables=dict(qmodules.items()))
    ckpt.save_and_keep_only(meta={"esc_plugin": "quantized"}, num_to_keep=1)
    report = qmodules.esc_report
    report.save_json(os.path.join(folder, "report.json"))
    report.plot(folder)


def load_quantized(brain_or_modules, folder):
    """Rebuild the quantized modules saved by the stage onto a Brain built from the FP32 checkpoint.

    The quantizer layout comes from ``quantized.pt``; weights and scales are
    then restored through SpeechBrain's ``Checkpointer`` from
    ``folder/checkpoint``, so the result equals what the stage evaluated.

    Arguments
    ---------
    brain_or_modules : speechbrain.core.Brain or torch.nn.ModuleDict
    folder : str

    Returns
    -------
    torch.nn.ModuleDict
        The quantized copy; use ``with bound_modules(brain, qmodules):`` (or
        ``StageResult.applied``) to run the Brain with it.
    """
    from ..core.api import load as esc_load
    modules = getattr(brain_or_modules, "modules", brain_or_modules)
    state = os.path.join(folder, "quantized.pt")
    if not os.path.exists(state):
        raise ConfigError(f"{folder} holds no quantized.pt: point to a folder written by quantize_brain "
                          "(default <output_folder>/quantized/<method>_w<b>a<b>).")
    qmodules = esc_load(modules, state)
    ckpt_dir = os.path.join(folder, "checkpoint")
    if os.path.isdir(ckpt_dir):
        Checkpointer(ckpt_dir, recoverables=dict(qmodules.items())).recover_if_possible()
    return qmodules


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
    batches = list(loader)
    if not batches:
        raise CalibrationError("the calibration loader produced no batch: check calib_set and loader_kwargs.")
    return batches


def _check_output_folder(brain, folder):
    ckpt = getattr(brain, "checkpointer", None)
    ckpt_dir = getattr(ckpt, "checkpoints_dir", None)
    if ckpt_dir is not None:
        a, b = os.path.realpath(folder), os.path.realpath(str(ckpt_dir))
        if a == b or a.startswith(b + os.sep):
            raise ConfigError(f"quantization: output_folder {folder} is inside the FP32 checkpoint folder "
                              f"{ckpt_dir}: choose another folder (the FP32 checkpoint is never written to).")


def _evaluate(brain, qmodules, test_set, loader_kwargs, folder, metric_name, settings):
    """``brain.evaluate`` with the quantized modules; its log and files go to ``folder``."""
    saved = _redirect_outputs(brain, folder)
    fp32_stats = brain.__dict__.get("test_stats")
    try:
        with bound_modules(brain, qmodules):
            # No checkpoint recovery here: on_evaluate_start would reload FP32 weights into the
            # original modules only (harmless), but we skip it so nothing touches the FP32 files.
            with _no_recovery(brain):
                brain.evaluate(test_set, test_loader_kwargs=dict(loader_kwargs), progressbar=None)
            result = _float_dict(getattr(brain, "test_stats", None)) or {}
            if metric_name != LOSS:
                result[f"{metric_name}_objective"] = read_value(getattr(brain, metric_name),
                                                                settings.metric_key, settings.higher_is_better)
    finally:
        _restore_outputs(brain, saved)
        if fp32_stats is not None:
            brain.test_stats = fp32_stats
    return result


@contextlib.contextmanager
def _no_recovery(brain):
    original = brain.on_evaluate_start
    brain.on_evaluate_start = lambda max_key=None, min_key=None: None
    try:
        yield
    finally:
        brain.on_evaluate_start = original


def _redirect_outputs(brain, folder):
    """Send the test logger and output files named in hparams into ``folder``,
    so the quantized evaluation never overwrites the FP32 run's files."""
    hp = vars(brain.hparams) if hasattr(brain.hparams, "__dict__") else {}
    out = str(hp.get("output_folder", "")) or None
    saved = {}
    for key, value in list(hp.items()):
        if isinstance(value, FileTrainLogger):
            saved[key] = value
            hp[key] = FileTrainLogger(os.path.join(folder, "log.txt"))
        elif (isinstance(value, str) and out and os.path.splitext(value)[1]
              and os.path.realpath(value).startswith(os.path.realpath(out) + os.sep)):
            saved[key] = value
            hp[key] = os.path.join(folder, os.path.basename(value))
    return saved


def _restore_outputs(brain, saved):
    vars(brain.hparams).update(saved)


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


def file_digest(path):
    """sha256 of a file (used by tests to show the FP32 checkpoint is unchanged)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
