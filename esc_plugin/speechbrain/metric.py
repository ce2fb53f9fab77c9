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
"""
import torch
from speechbrain.utils.metric_stats import (
    EER, BinaryMetricStats, ClassificationStats, ErrorRateStats, MetricStats, minDCF,
)

from ..core.errors import ConfigError

LOSS = "loss"


def find_trackers(brain):
    """``{attribute name: MetricStats}`` currently on ``brain``."""
    return {k: v for k, v in vars(brain).items() if isinstance(v, MetricStats)}


def choose_tracker(brain, name):
    """The attribute name of the tracker to optimise (``name`` or the only one)."""
    if name == LOSS:
        return LOSS
    trackers = find_trackers(brain)
    if name is not None:
        if name not in trackers:
            raise ConfigError(
                f"quantization: metric={name!r} is not a MetricStats attribute of {type(brain).__name__} "
                f"after on_stage_start(TEST) (found: {sorted(trackers) or 'none'}); name one of them, or "
                "use `metric: loss` to optimise the loss returned by compute_objectives.")
        return name
    if not trackers:
        raise ConfigError(
            f"{type(brain).__name__} has no metric to optimise: on_stage_start(TEST) created no "
            "speechbrain MetricStats (ErrorRateStats, ClassificationStats, BinaryMetricStats, MetricStats). "
            "Create one there and append to it in compute_objectives, or set `quantization: {metric: loss}` "
            "to optimise the loss returned by compute_objectives.")
    if len(trackers) > 1:
        raise ConfigError(
            f"{type(brain).__name__} has several metrics {sorted(trackers)}: choose the one to optimise "
            "with `quantization: {metric: <name>}`.")
    return next(iter(trackers))


def check_direction(tracker, key, higher_is_better):
    """Fail early when a plain MetricStats' direction is unknown."""
    special = isinstance(tracker, (ErrorRateStats, ClassificationStats, BinaryMetricStats))
    if not special and higher_is_better is None:
        name = getattr(getattr(tracker, "metric", None), "__name__", "?")
        raise ConfigError(
            f"the metric {name!r} is a plain MetricStats: say whether higher is better with "
            "`quantization: {higher_is_better: true}` (PESQ, STOI, accuracy) or false (losses, distances).")


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
