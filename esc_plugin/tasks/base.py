"""The contract between a task (model + data + metric) and the quantizer.

A :class:`Task` bundles everything ``esc.quantize`` and the benchmarks need:
the FP32 model, a forward loop over the calibration inputs, the calibration
objective (task error, lower is better) and an evaluation on a split that is
disjoint from the calibration samples.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch.nn as nn

from esc_plugin.core.selection import SplitObjective  # noqa: F401  (tasks build their objectives with it)


@dataclass
class Task:
    """A quantization task.

    Arguments
    ---------
    name : str
        Short identifier, e.g. ``"honk-res8-narrow"``.
    model : nn.Module
        The FP32 model, in eval mode. Never modified by quantization.
    forward_loop : callable
        ``forward_loop(model)`` runs the calibration inputs through ``model``.
    objective : callable
        ``objective(model) -> float``: task error on the calibration samples,
        lower is better. Features and FP32 references are cached by the task,
        so a call only redoes the work that depends on the model.
    evaluate : callable
        ``evaluate(model) -> dict``: metrics on the evaluation split.
    metric : str
        The headline key of ``evaluate``'s dict.
    higher_is_better : bool
        Direction of ``metric``.
    info : dict
        Free-form facts (split sizes, data paths) for reports.
    """

    name: str
    model: nn.Module
    forward_loop: Callable[[nn.Module], None]
    objective: Callable[[nn.Module], float]
    evaluate: Callable[[nn.Module], Dict[str, float]]
    metric: str
    higher_is_better: bool
    info: dict = field(default_factory=dict)

