"""Evaluating a group of candidates on an :class:`~esc_plugin.core.context.Evaluator`.

Shared by every executor: the serial one runs it on the calibration
context's own evaluator, each Ray actor on its copy. A group is one
candidate, or ``batch_candidates`` of them sharing one tiled forward pass
(:mod:`esc_plugin.core.batching`). Evaluation numbers are global (the
driver's count before the group), so an error raised anywhere names the
same evaluation as a serial run would.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..batching import BatchingError, CandidateTiling

# Batched and one-by-one objective values may differ by float rounding (other kernel blocking for
# other batch sizes); a tiling that mixes candidates' rows differs by quantization-step amounts.
BATCH_CHECK_RTOL = 1e-4


@dataclass
class Evaluation:
    """One candidate's result: the loss the search is told, its held-back score, time, non-finite flag."""

    loss: float
    selection: Optional[float]
    seconds: float
    nonfinite: bool


def evaluate_one(evaluator, index, amax, set_amax=True):
    """``evaluator(amax)`` as evaluation number ``index + 1``; leaves ``evaluator.count == index + 1``."""
    evaluator.count = index
    seconds, nonfinite = evaluator.seconds, evaluator.n_nonfinite
    loss = evaluator(amax if set_amax else None)
    return Evaluation(loss, evaluator.last_selection, evaluator.seconds - seconds,
                      evaluator.n_nonfinite > nonfinite)


def evaluate_group(evaluator, index, amaxes, check=False):
    """Evaluations of ``amaxes`` (numbers ``index + 1 …``), one by one or in one tiled batch.

    ``check``: also evaluate the group's last candidate alone and compare
    (the first batched group of a run does, so a model whose activations are
    not batch-first fails loudly instead of mixing candidates).
    """
    amaxes = [np.asarray(a, dtype=np.float64) for a in amaxes]
    if len(amaxes) == 1:
        return [evaluate_one(evaluator, index, amaxes[0])]
    quantizers = [p.input_quantizer for p in evaluator.plan.active_points()]
    tiling = CandidateTiling(evaluator.qmodel, quantizers, amaxes)
    results = []
    with tiling:
        for j in range(len(amaxes)):
            results.append(tiling.run_candidate(j, lambda j=j: evaluate_one(evaluator, index + j, None, False)))
    evaluator.plan.set_act_amax(amaxes[-1])  # as after evaluating the group one by one
    if check:
        _check_against_single(evaluator, index + len(amaxes) - 1, amaxes[-1], results[-1])
    return results


def _check_against_single(evaluator, index, amax, batched):
    count, seconds, nonfinite = evaluator.count, evaluator.seconds, evaluator.n_nonfinite
    single = evaluate_one(evaluator, index, amax)
    evaluator.count, evaluator.seconds, evaluator.n_nonfinite = count, seconds, nonfinite  # not part of Γ
    if not np.isclose(batched.loss, single.loss, rtol=BATCH_CHECK_RTOL, atol=0.0):
        raise BatchingError(
            f"batch_candidates={evaluator.plan.config.batch_candidates}: evaluation {index + 1} gave "
            f"{batched.loss!r} in a tiled batch but {single.loss!r} alone: the model mixes the rows of "
            "different candidates (activations that are not batch-first at some quantized op, e.g. a "
            "layer applied time-major, or an op across the batch). Use batch_candidates=1.")
