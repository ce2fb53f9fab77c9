"""Classification error measures: error rate, accuracy and macro mAP."""
import numpy as np

from ._arrays import to_numpy


def _int_labels(labels, name="labels"):
    y = to_numpy(labels, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D class indices, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty; pass at least one example")
    if not np.issubdtype(y.dtype, np.number) or not np.all(y == np.round(y)):
        raise ValueError(f"{name} must be integer class indices")
    return y.astype(np.int64)


def _predictions(logits_or_preds, labels):
    y = _int_labels(labels)
    x = to_numpy(logits_or_preds, "logits_or_preds")
    if x.ndim == 2:
        if not np.all(np.isfinite(x)):
            raise ValueError("logits contain NaN or inf; argmax would be arbitrary")
        preds = x.argmax(axis=1)
    elif x.ndim == 1:
        preds = _int_labels(x, "predictions")
    else:
        raise ValueError(
            "logits_or_preds must be (batch, classes) scores or (batch,) "
            f"predicted indices, got shape {x.shape}"
        )
    if preds.shape[0] != y.shape[0]:
        raise ValueError(
            f"{preds.shape[0]} predictions but {y.shape[0]} labels; "
            "they must pair up one-to-one"
        )
    return preds, y


def classification_error(logits_or_preds, labels):
    """Fraction of misclassified examples.

    Arguments
    ---------
    logits_or_preds : array-like
        ``(batch, classes)`` scores/logits (argmax is taken) or ``(batch,)``
        predicted class indices.
    labels : array-like
        ``(batch,)`` true class indices.

    Returns
    -------
    float
        Error rate in [0, 1].

    Example
    -------
    >>> classification_error([[2.0, 0.1], [0.3, 0.9], [1.0, 0.0]], [0, 0, 0])
    0.3333333333333333
    >>> classification_error([1, 2, 3, 4], [1, 2, 3, 0])
    0.25
    """
    preds, y = _predictions(logits_or_preds, labels)
    return float(np.mean(preds != y))


def accuracy(logits_or_preds, labels):
    """Fraction of correctly classified examples (1 - classification error).

    Arguments
    ---------
    logits_or_preds : array-like
        ``(batch, classes)`` scores/logits or ``(batch,)`` predicted indices.
    labels : array-like
        ``(batch,)`` true class indices.

    Returns
    -------
    float
        Accuracy in [0, 1].

    Example
    -------
    >>> accuracy([1, 2, 3, 4], [1, 2, 3, 0])
    0.75
    """
    preds, y = _predictions(logits_or_preds, labels)
    return float(np.mean(preds == y))


def _average_precision(scores, positive):
    """AP of one class, computed like sklearn's ``average_precision_score``:
    sum over distinct thresholds of (recall step) * precision."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # Tied scores form one threshold, so only the last index of a run counts.
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(positive)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, labels, num_classes=None):
    """Macro mean average precision, one-vs-rest, over the classes present.

    Classes without a positive example are skipped (their AP is undefined);
    this equals sklearn's ``average_precision_score(..., average="macro")``
    restricted to those classes.

    Arguments
    ---------
    scores : array-like
        ``(batch, classes)`` scores; higher means more likely.
    labels : array-like
        ``(batch,)`` class indices, or ``(batch, classes)`` 0/1 multi-hot
        targets for multi-label tasks.
    num_classes : int, optional
        Expected number of classes; checked against ``scores.shape[1]``.

    Returns
    -------
    float
        mAP in [0, 1].

    Example
    -------
    >>> scores = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]
    >>> round(mean_average_precision(scores, [0, 1, 1, 0]), 4)
    0.8333
    """
    s = to_numpy(scores, "scores")
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(
            f"scores must be a non-empty (batch, classes) array, got {s.shape}"
        )
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf; fix them before ranking")
    n, c = s.shape
    if num_classes is not None and num_classes != c:
        raise ValueError(f"scores have {c} columns but num_classes={num_classes}")
    y = to_numpy(labels, "labels")
    if y.ndim == 1:
        y = _int_labels(y)
        if y.min() < 0 or y.max() >= c:
            raise ValueError(f"labels must lie in [0, {c - 1}] for {c} score columns")
        y = np.eye(c, dtype=np.int64)[y]
    elif y.shape == s.shape:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("multi-hot labels must contain only 0 and 1")
        y = y.astype(np.int64)
    if y.shape != (n, c):
        raise ValueError(
            f"labels must be ({n},) indices or ({n}, {c}) multi-hot, "
            f"got shape {to_numpy(labels, 'labels').shape}"
        )
    present = np.nonzero(y.sum(axis=0) > 0)[0]
    if present.size == 0:
        raise ValueError("no class has a positive example; mAP is undefined")
    return float(np.mean([_average_precision(s[:, k], y[:, k]) for k in present]))
