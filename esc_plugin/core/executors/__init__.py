"""Executors: where the ESC search evaluates each CMA-ES generation's candidates.

The optimizer (:class:`~esc_plugin.core.search.ScaleSearch`) only asks and
tells; :class:`~esc_plugin.core.search_driver.SearchDriver` hands each
generation's candidates (amax vectors) to the executor named by
``QuantConfig(executor=...)`` and tells the losses back in candidate order,
so every executor ends with the same scales:

* ``serial`` (default): in this process;
* ``ray``: ``QuantConfig(workers=N)`` Ray actors, each sent the quantized
  copy and the objective once, then only amax vectors
  (:mod:`esc_plugin.core.executors.ray_actors`).

An executor is one class, registered by name: ``cls(ctx)`` with
``evaluate(candidates, progress) -> [Evaluation]`` (in candidate order, the
context's evaluator counting them) and ``close()``.

Example
-------
>>> from esc_plugin.core.executors import executor_names
>>> executor_names()
['ray', 'serial']
"""
import importlib

_EXECUTORS = {}
# built-ins, imported when first asked for (the ray module imports ray only when used)
_BUILTIN = {"serial": "serial", "ray": "ray_actors"}


def register_executor(name, summary=""):
    """Class decorator registering an executor under ``name`` (``QuantConfig(executor=name)``)."""
    def wrap(cls):
        cls.executor_name, cls.summary = name, summary
        _EXECUTORS[name] = cls
        return cls
    return wrap


def executor_names():
    """Every executor name ``QuantConfig(executor=...)`` accepts, sorted."""
    return sorted(set(_EXECUTORS) | set(_BUILTIN))


def get_executor(name):
    if name not in _EXECUTORS and name in _BUILTIN:
        importlib.import_module(f"{__name__}.{_BUILTIN[name]}")
    return _EXECUTORS[name]


def make_executor(ctx):
    """The executor ``ctx.config.executor`` names, started for this calibration context."""
    from ..batching import supports_batching
    from ..errors import ConfigError

    k = ctx.config.batch_candidates
    if k > 1 and not supports_batching(ctx.evaluator.objective):
        raise ConfigError(f"batch_candidates={k}: the search objective ({type(ctx.evaluator.objective).__name__}) "
                          "does not declare supports_candidate_batching = True (see esc_plugin.core.batching): "
                          "set it if its model calls can be tiled, or use batch_candidates=1.")
    return get_executor(ctx.config.executor)(ctx)


__all__ = ["register_executor", "executor_names", "get_executor", "make_executor"]
