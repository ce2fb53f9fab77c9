"""Turn a Brain's own ``MetricStats`` into the ESC objective (lower is better).

A recipe creates its metric trackers in ``on_stage_start`` and fills them in
``compute_objectives``; the stage finds them on the Brain and reads one number:

======================  ==================  =========================
tracker                 default key         objective
======================  ==================  =========================
ErrorRateStats          ``error_rate``      WER / CER (%)
ClassificationStats     ``accuracy``        1 − accuracy
BinaryMetricStats       ``EER``             EER (``minDCF`` also)
MetricStats             ``average``         average, negated when
                                            ``higher_is_better``
``metric: loss``        —                   mean loss of compute_objectives
======================  ==================  =========================

A plain ``MetricStats`` over one of SpeechBrain's losses (``classification_error``,
``nll_loss``, … in ``speechbrain.nnet.losses``) or a function named as a loss,
error or distance is lower-is-better without being told; when a Brain has an
error tracker and a loss tracker (SpeechBrain's templates), the error tracker
is the objective. Both inferences are written to the report's notes.
"""
import functools

import torch
from speechbrain.utils.metric_stats import (
    EER, BinaryMetricStats, ClassificationStats, ErrorRateStats, MetricStats, minDCF,
)

from ..core.errors import ConfigError

LOSS = "loss"
# Modules whose functions are losses or distances: lower is better, no need to ask.
LOWER_IS_BETTER_MODULES = ("speechbrain.nnet.losses", "speechbrain.nnet.loss.")
LOWER_IS_BETTER_NAMES = ("loss", "error", "distance", "dist")
SPECIAL = (ErrorRateStats, ClassificationStats, BinaryMetricStats)


def find_trackers(brain):
    """``{attribute name: MetricStats}`` currently on ``brain``."""
    return {k: v for k, v in vars(brain).items() if isinstance(v, MetricStats)}


def metric_function(tracker):
    """The function a plain MetricStats applies, through ``functools.partial`` layers
    (hyperpyyaml's ``!name:f {reduction: batch}`` gives a partial)."""
    fn = getattr(tracker, "metric", None)
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def describe(tracker):
    """``'MetricStats over speechbrain.nnet.losses.nll_loss'`` (for messages and notes)."""
    if isinstance(tracker, SPECIAL):
        return type(tracker).__name__
    fn = metric_function(tracker)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{type(tracker).__name__} over {module + '.' if module else ''}{name}"


def tracker_kind(tracker):
    """``"error"`` (error rate, EER, classification error), ``"loss"`` (a loss or distance),
    or ``"task"`` (any other metric, e.g. PESQ)."""
    if isinstance(tracker, SPECIAL):
        return "error"
    fn = metric_function(tracker)
    name = (getattr(fn, "__name__", "") or "").lower()
    if "error" in name:
        return "error"
    module = getattr(fn, "__module__", "") or ""
    if module.startswith(LOWER_IS_BETTER_MODULES) or any(w in name for w in LOWER_IS_BETTER_NAMES):
        return "loss"
    return "task"


def inferred_lower_is_better(tracker):
    """True when the plain MetricStats' function says so plainly: SpeechBrain's losses
    (``classification_error`` included) and functions named as losses, errors or distances."""
    fn = metric_function(tracker)
    module = getattr(fn, "__module__", "") or ""
    name = (getattr(fn, "__name__", "") or "").lower()
    return module.startswith(LOWER_IS_BETTER_MODULES) or any(w in name for w in LOWER_IS_BETTER_NAMES)


def choose_tracker(brain, name):
    """The attribute name of the tracker to optimise, and notes on what was inferred.

    ``name`` if given; else the only tracker; else the only one that is not a
    loss tracker (a template Brain has an error tracker and a loss tracker:
    the error rate is the task's metric).

    Example
    -------
    >>> import types
    >>> from speechbrain.nnet.losses import classification_error, nll_loss
    >>> brain = types.SimpleNamespace(error_metrics=MetricStats(metric=classification_error),
    ...                               loss_metric=MetricStats(metric=nll_loss))
    >>> name, notes = choose_tracker(brain, None)
    >>> name, "over the loss tracker(s) ['loss_metric']" in notes[0]
    ('error_metrics', True)
    """
    if name == LOSS:
        return LOSS, []
    trackers = find_trackers(brain)
    if name is not None:
        if name not in trackers:
            raise ConfigError(
                f"quantization: metric={name!r} is not a MetricStats attribute of {type(brain).__name__} "
                f"after on_stage_start(TEST) (found: {sorted(trackers) or 'none'}); name one of them, or "
                "use `metric: loss` to optimise the loss returned by compute_objectives.")
        return name, []
    if not trackers:
        raise ConfigError(
            f"{type(brain).__name__} has no metric to optimise: on_stage_start(TEST) created no "
            "speechbrain MetricStats (ErrorRateStats, ClassificationStats, BinaryMetricStats, MetricStats). "
            "Create one there and append to it in compute_objectives, or set `quantization: {metric: loss}` "
            "to optimise the loss returned by compute_objectives.")
    if len(trackers) == 1:
        return next(iter(trackers)), []
    kinds = {k: tracker_kind(v) for k, v in trackers.items()}
    task = sorted(k for k, kind in kinds.items() if kind != "loss")
    if len(task) == 1:
        losses = sorted(k for k in trackers if k != task[0])
        return task[0], [f"objective: {task[0]} ({describe(trackers[task[0]])}) chosen over the loss "
                         f"tracker(s) {losses}; set `quantization: {{metric: <name>}}` to choose another"]
    listed = ", ".join(f"{k} ({describe(v)})" for k, v in sorted(trackers.items()))
    raise ConfigError(
        f"{type(brain).__name__} has several metrics: {listed}; choose the one to optimise "
        "with `quantization: {metric: <name>}`.")


def resolve_direction(name, tracker, key, higher_is_better):
    """``higher_is_better`` for the chosen tracker (said, inferred, or an error naming it), and a note.

    Example
    -------
    >>> import functools
    >>> from speechbrain.nnet.losses import classification_error
    >>> stats = MetricStats(metric=functools.partial(classification_error, reduction="batch"))
    >>> resolve_direction("error_metrics", stats, None, None)[0]
    False
    >>> resolve_direction("pesq_metric", MetricStats(metric=lambda *a: 0.0), None, None)
    Traceback (most recent call last):
    ...
    esc_plugin.core.errors.ConfigError: the metric 'pesq_metric' (MetricStats over esc_plugin.speechbrain.metric.<lambda>) is a plain MetricStats whose direction is unknown: say whether higher is better with `quantization: {higher_is_better: true}` (PESQ, STOI, accuracy) or false (losses, distances).
    """
    if isinstance(tracker, SPECIAL) or higher_is_better is not None:
        return higher_is_better, None
    if inferred_lower_is_better(tracker):
        return False, (f"direction: {name} ({describe(tracker)}) is a loss / error / distance, "
                       "so lower is better (inferred; set `higher_is_better` to override)")
    raise ConfigError(
        f"the metric {name!r} ({describe(tracker)}) is a plain MetricStats whose direction is unknown: "
        "say whether higher is better with `quantization: {higher_is_better: true}` (PESQ, STOI, "
        "accuracy) or false (losses, distances).")


def read_value(tracker, key=None, higher_is_better=None):
    """The tracker's value as an error: lower is better.

    Example
    -------
    >>> from speechbrain.utils.metric_stats import ErrorRateStats
    >>> stats = ErrorRateStats()
    >>> stats.append(["a"], [["hello", "world"]], [["hello", "word"]])
    >>> read_value(stats)
    50.0
    """
    if isinstance(tracker, ErrorRateStats):
        return float(tracker.summarize(key or "error_rate"))
    if isinstance(tracker, ClassificationStats):
        key = key or "accuracy"
        value = float(tracker.summarize(key))
        return 1.0 - value if key == "accuracy" else value
    if isinstance(tracker, BinaryMetricStats):
        scores = torch.as_tensor(torch.stack(tracker.scores) if isinstance(tracker.scores, list)
                                 else tracker.scores).flatten()
        labels = torch.as_tensor(torch.stack(tracker.labels) if isinstance(tracker.labels, list)
                                 else tracker.labels).flatten()
        pos, neg = scores[labels == tracker.positive_label], scores[labels != tracker.positive_label]
        key = key or "EER"
        if key == "EER":
            return float(EER(pos, neg)[0])
        if key == "minDCF":
            return float(minDCF(pos, neg)[0])
        value = float(tracker.summarize(key))
        return -value if higher_is_better else value
    value = float(tracker.summarize(key or "average"))
    return -value if higher_is_better else value


def fp32_lacks_test_metrics(metrics):
    """True when ``metrics["fp32"]`` misses a test metric that ``metrics["quantized"]`` has, so the
    two rows of a table could not be compared."""
    return metrics["fp32"] is None or not set(metrics["quantized"] or {}) <= set(metrics["fp32"])
