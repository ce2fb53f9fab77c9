"""Registries of calibrators and PTQ transforms (extension by registration).

In the spirit of ModelOpt's calibrate modes and torchao's config -> handler
map: a calibrator or a PTQ pass is a class in one file, registered under a
name; :class:`~esc_plugin.core.config.QuantConfig` validates ``method`` and
``ptq`` against these registries, and the CLI, benchmarks and the SpeechBrain
/ NeMo settings list their choices from them instead of keeping lists of names.

The built-ins live in :mod:`esc_plugin.core.calibrators` and
:mod:`esc_plugin.core.transforms`; they register themselves when those
packages are imported, which the lookups below do on first use. A user's
calibrator registers the same way, in their own module, before it is named in
a config.

Example
-------
>>> from esc_plugin.core.registry import calibrator_names, get_calibrator, register_calibrator
>>> calibrator_names()[:5]
('max', 'percentile', 'entropy', 'mse', 'esc')
>>> get_calibrator("esc").objective, sorted(get_calibrator("esc").needs)
('optional', ['max', 'samples'])
>>> @register_calibrator("half_max", needs=("max",), summary="half the observed max")
... class HalfMax:
...     def __init__(self, config):
...         self.config = config
...     def calibrate(self, ctx):
...         return ctx.maxes / 2
>>> "half_max" in calibrator_names()
True
>>> unregister_calibrator("half_max")
"""
import importlib
from dataclasses import dataclass
from typing import FrozenSet

from .errors import ConfigError

STATISTICS = ("max", "histogram", "samples")
OBJECTIVE_USE = ("none", "optional", "required")
STAGES = ("before_calibration", "after_calibration")


@dataclass(frozen=True)
class CalibratorSpec:
    """A registered calibrator.

    Attributes
    ----------
    name : str
    cls : type
        ``cls(config)`` has ``calibrate(ctx) -> amax array`` (one value per
        active site of ``ctx``), and optionally ``state_dict()`` /
        ``load_state_dict(state)``.
    needs : frozenset
        Statistics of the FP32 activations it reads from the context:
        ``max`` (always collected), ``histogram`` (|x| histograms, a second
        pass) and ``samples`` (bounded input samples per site).
    objective : str
        ``none`` (ignores it), ``optional`` (uses it when given) or
        ``required`` (an error before any work when missing).
    summary : str
        One line for ``--help`` texts and tables.
    """

    name: str
    cls: type
    needs: FrozenSet[str]
    objective: str
    summary: str


@dataclass(frozen=True)
class TransformSpec:
    """A registered PTQ pass (``QuantConfig(ptq=(name, ...))``).

    ``cls(config)`` has ``apply(ctx)`` (changes ``ctx.model``, the quantized
    copy, in place; the FP32 model is never reached), ``state_dict()`` and
    ``load_state_dict(state, ctx)`` (re-applies a saved result without
    calibration data). ``stage`` says when it runs: ``before_calibration``
    (e.g. SmoothQuant, which changes the activations the calibrator sees) or
    ``after_calibration`` (e.g. bias correction, which needs the final scales).
    ``order`` ranks passes within a stage: a ``ptq`` tuple must list them in
    non-decreasing order (weight reconstruction before bias correction, which
    measures the output shift of the final weights, before fallback, which
    judges the finished model), so the order that runs is the order written.
    """

    name: str
    cls: type
    stage: str
    summary: str
    order: int = 50


_CALIBRATORS = {}
_TRANSFORMS = {}


def register_calibrator(name, *, needs=("max",), objective="none", summary=""):
    """Class decorator registering a calibrator under ``name`` (see :class:`CalibratorSpec`)."""
    needs = frozenset(needs) | {"max"}
    bad = sorted(needs - set(STATISTICS))
    if bad:
        raise ConfigError(f"calibrator {name!r}: unknown statistics {bad}; choose from {list(STATISTICS)}.")
    if objective not in OBJECTIVE_USE:
        raise ConfigError(f"calibrator {name!r}: objective={objective!r}; use one of {list(OBJECTIVE_USE)}.")

    def decorate(cls):
        _check_name(name, _CALIBRATORS, "calibrator", cls)
        _CALIBRATORS[name] = CalibratorSpec(name, cls, needs, objective, summary)
        cls.registered_name = name
        return cls

    return decorate


def register_transform(name, *, stage, summary="", order=50):
    """Class decorator registering a PTQ pass under ``name`` (see :class:`TransformSpec`)."""
    if stage not in STAGES:
        raise ConfigError(f"transform {name!r}: stage={stage!r}; use one of {list(STAGES)}.")
    if isinstance(order, bool) or not isinstance(order, int):
        raise ConfigError(f"transform {name!r}: order={order!r} must be an integer (lower runs first).")

    def decorate(cls):
        _check_name(name, _TRANSFORMS, "transform", cls)
        _TRANSFORMS[name] = TransformSpec(name, cls, stage, summary, order)
        cls.registered_name = name
        return cls

    return decorate


def check_transform_order(names):
    """A :class:`ConfigError` when ``names`` lists passes of one stage against their ``order``."""
    specs = [get_transform(n) for n in names]
    for stage in STAGES:
        in_stage = [s for s in specs if s.stage == stage]
        wanted = sorted(in_stage, key=lambda s: s.order)
        if [s.order for s in in_stage] != [s.order for s in wanted]:
            raise ConfigError(
                f"ptq={tuple(names)} runs {stage.replace('_', ' ')} passes out of order: write "
                f"{tuple(s.name for s in wanted)} (weight reconstruction, then bias correction, then "
                "fallback: each later pass works on what the earlier ones produced).")


def _check_name(name, table, kind, cls):
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{kind} name {name!r} must be an identifier-like string (e.g. 'my_{kind}').")
    old = table.get(name)
    # Re-registering the same class (a module imported twice, e.g. by doctest) is harmless.
    if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(f"a {kind} named {name!r} is already registered ({old.cls.__module__}."
                          f"{old.cls.__qualname__}): choose another name.")


def unregister_calibrator(name):
    _CALIBRATORS.pop(name, None)


def unregister_transform(name):
    _TRANSFORMS.pop(name, None)


def _load_builtins():
    importlib.import_module("esc_plugin.core.calibrators")
    importlib.import_module("esc_plugin.core.transforms")


def calibrator_names():
    """Registered calibrator names, built-ins first (in registration order)."""
    _load_builtins()
    return tuple(_CALIBRATORS)


def transform_names():
    """Registered PTQ pass names."""
    _load_builtins()
    return tuple(_TRANSFORMS)


def get_calibrator(name):
    """The :class:`CalibratorSpec` of ``name``; a :class:`ConfigError` listing the valid names otherwise."""
    _load_builtins()
    if name not in _CALIBRATORS:
        raise ConfigError(f"method={name!r} is unknown: choose one of {', '.join(_CALIBRATORS)} "
                          "(or register your own with esc_plugin.register_calibrator).")
    return _CALIBRATORS[name]


def get_transform(name):
    """The :class:`TransformSpec` of ``name``; a :class:`ConfigError` listing the valid names otherwise."""
    _load_builtins()
    if name not in _TRANSFORMS:
        valid = ", ".join(_TRANSFORMS) or "(none registered)"
        raise ConfigError(f"ptq pass {name!r} is unknown: choose from {valid} "
                          "(or register your own with esc_plugin.register_transform).")
    return _TRANSFORMS[name]
