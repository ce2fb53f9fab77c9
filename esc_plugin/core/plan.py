"""Insert quantizers into a copy of the model and keep track of them."""
import copy
import fnmatch

import torch
import torch.nn as nn

from .attention import mark_attention_modules
from .errors import QuantizationError
from .modules import (embedding_quantizable, functional_children, keep_transformer_layers_unfused,
                      uses_functional_weights, wrap_embedding, wrap_functional, wrap_module, wrappable)
from .observers import ActivationObserver


class QuantPlan:
    """The quantized ops of one model, in execution-independent (module) order.

    Functional call sites are appended the first time they run.
    """

    def __init__(self, config):
        self.config = config
        self.modules = {}  # name -> every module given quantizers (for state files)
        self.points = []
        self.excluded = []
        self.weight_only = []  # modules quantized without an activation quantizer (embeddings)
        self.observer_factory = None  # set during calibration passes
        self.observing = False

    def add_point(self, point):
        self.points.append(point)
        if self.observing:
            point.input_quantizer.disable()
        if self.observer_factory is not None:
            point.input_quantizer.observer = self.observer_factory(point)

    def weight_quantizers(self):
        seen = [m.weight_quantizer for m in self.weight_only]
        for p in self.points:
            for q in (getattr(p.module, "weight_quantizer", None),):
                if q is not None and q not in seen:
                    seen.append(q)
            for q in getattr(p.module, "esc_weight_quantizers", {}).values():
                if q not in seen:
                    seen.append(q)
        return seen

    def weight_owners(self):
        """``(name, module)`` of every module holding weight quantizers."""
        return [(n, m) for n, m in self.modules.items()
                if getattr(m, "weight_quantizer", None) is not None or getattr(m, "esc_weight_quantizers", None)]

    def start_observing(self, factory):
        """Quantizers off, observers on: the model computes in FP32."""
        self.observing, self.observer_factory = True, factory
        for q in self.weight_quantizers():
            q.disable()
        for p in self.points:
            p.input_quantizer.disable()
            p.input_quantizer.observer = factory(p)

    def stop_observing(self):
        self.observing, self.observer_factory = False, None
        for q in self.weight_quantizers():
            q.enable()
        for p in self.points:
            p.input_quantizer.observer = None
            if not getattr(p, "unused", False):
                p.input_quantizer.enable()

    def set_act_amax(self, values):
        for p, v in zip(self.active_points(), values):
            p.input_quantizer.set_amax(v)

    def active_points(self):
        return [p for p in self.points if p.input_quantizer.is_enabled or self.observing]


def _excluded(name, patterns):
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def insert_quantizers(model, config):
    """Deep-copy ``model`` and insert quantizers; returns ``(qmodel, plan)``.

    The FP32 model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"esc.quantize expects a torch.nn.Module, got {type(model).__name__}.")
    check_not_quantized(model)
    qmodel = copy.deepcopy(model).eval()
    plan = QuantPlan(config)
    skip = set()
    n_functional = 0
    for name, module in list(qmodel.named_modules()):
        if module in skip:
            continue
        if name and _excluded(name, config.exclude):
            plan.excluded.append(name)
            skip.update(module.modules())
            continue
        if wrappable(module):
            if isinstance(module, nn.LayerNorm) and not config.quantize_layernorm:
                continue
            plan.points.append(wrap_module(module, name, config.weight_bits, config.act_bits))
            plan.modules[name] = module
        elif config.quantize_embeddings and embedding_quantizable(module):
            plan.weight_only.append(wrap_embedding(module, config.weight_bits))
            plan.modules[name] = module
        elif uses_functional_weights(module):
            skip.update(functional_children(module))
            wrap_functional(module, name, config.weight_bits, config.act_bits, plan.add_point)
            plan.modules[name] = module
            n_functional += 1
    if not plan.points and not n_functional and not config.quantize_attention:
        raise QuantizationError(
            f"{type(model).__name__} has no quantizable op: esc_plugin quantizes nn.Conv1d, nn.Conv2d, "
            "nn.Linear and nn.LayerNorm modules and F.linear calls on a module's own 2-D parameters. "
            "Pass the sub-module that holds them, or check QuantConfig.exclude."
        )
    keep_transformer_layers_unfused(qmodel)
    if config.quantize_attention:
        mark_attention_modules(qmodel, plan)
    qmodel.__dict__["esc_plan"] = plan
    return qmodel, plan


def check_not_quantized(model):
    """Refuse a model that already carries esc_plugin quantizers (quantize the FP32 model)."""
    from .modules import FunctionalLinearMixin, QuantMixin

    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantMixin, FunctionalLinearMixin))]
    if "esc_plan" in model.__dict__ or quantized:
        where = f" (e.g. '{quantized[0] or type(model).__name__}')" if quantized else ""
        raise QuantizationError(
            f"{type(model).__name__} is already quantized{where}: pass the FP32 model to esc.quantize "
            "(to change a quantized model's config, quantize the FP32 model again with the new config).")


@torch.no_grad()
def observe(plan, model, forward_loop, seed=0, sample_elements=0, hist_ranges=None, bins=0,
            nan_policy="error"):
    """Run ``forward_loop`` in FP32 with an observer on every activation quantizer."""
    observers = {}

    def factory(point):
        hist_range = (hist_ranges or {}).get(point.name)
        obs = ActivationObserver(point.row_features, sample_elements, bins if hist_range else 0,
                                 hist_range, seed + len(observers), name=point.name, nan_policy=nan_policy)
        observers[point.name] = obs
        return obs

    plan.start_observing(factory)
    try:
        forward_loop(model)
    finally:
        plan.stop_observing()
    return observers
