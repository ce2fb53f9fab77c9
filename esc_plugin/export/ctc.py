"""Greedy CTC decoding of an exported acoustic model's outputs (numpy only, no torch).

An exported CTC model (e.g. the in-project Conformer-CTC: features -> frame
logits) gives ``(batch, frames, tokens)`` scores; :func:`ctc_greedy_decode`
turns them into token ids the way SpeechBrain's ``ctc_greedy_decode`` does:
best token per frame, repeats collapsed, blanks dropped.
"""
import numpy as np


def ctc_greedy_decode(scores, blank=0, lengths=None):
    """Token ids per row of ``scores`` (batch, frames, tokens): argmax, collapse repeats, drop ``blank``.

    Arguments
    ---------
    scores : array-like
        Logits or log-probabilities (any monotonic transform: only the argmax is used).
    blank : int
        Index of the CTC blank.
    lengths : array-like, optional
        Valid frames per row (default: all).

    Example
    -------
    >>> s = np.eye(3)[[[1, 1, 0, 1, 2, 2, 0]]]   # frames: a a _ a b b _
    >>> ctc_greedy_decode(s)
    [[1, 1, 2]]
    """
    best = np.asarray(scores).argmax(-1)
    out = []
    for row, ids in enumerate(best):
        ids = ids[: int(lengths[row])] if lengths is not None else ids
        keep = np.ones(len(ids), bool)
        keep[1:] = ids[1:] != ids[:-1]
        out.append([int(t) for t in ids[keep] if t != blank])
    return out
