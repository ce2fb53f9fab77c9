"""Public entry points: ``quantize``, ``save``, ``load``.

Modelled on ModelOpt's ``mtq.quantize(model, cfg, forward_loop)``: the caller
hands a forward loop over calibration data (and, for ESC, an objective); the
library owns the quantizers. The work is done by :mod:`~esc_plugin.core.pipeline`
(registered calibrators and PTQ passes); the file format is in
:mod:`~esc_plugin.core.state`.
"""
from .attention import add_attention_site, attention_sites
from .config import QuantConfig
from .context import CalibrationContext
from .errors import CalibrationError, ConfigError
from .io import torch_save
from .pipeline import run_pipeline
from .plan import check_not_quantized, insert_quantizers
from .registry import get_transform
from .report import QuantReport
from .state import (FORMAT, READABLE_FORMATS, module_weight_quantizers, read_state_file, site_state,
                    state_digest, weights_sum_fingerprint)


def quantize(model, config=None, forward_loop=None, objective=None, *, progress=True):
    """Return a quantized copy of ``model``; the FP32 model is untouched.

    Arguments
    ---------
    model : torch.nn.Module
        The FP32 model.
    config : QuantConfig
        Bits, calibrator and PTQ passes (default: W8A8 ESC).
    forward_loop : callable
        ``forward_loop(model)`` runs the calibration inputs through ``model``.
    objective : callable
        ``objective(model) -> float``: task error on the calibration samples,
        lower is better. Required by ``esc``; ``percentile`` uses it to pick
        the best percentile; the other baselines ignore it.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    torch.nn.Module
        The quantized copy, with ``.esc_report`` (a :class:`QuantReport`).

    Example
    -------
    >>> import torch, esc_plugin as esc
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> data = [torch.randn(4, 8) for _ in range(3)]
    >>> def loop(m):
    ...     for x in data: m(x)
    >>> def error(m):
    ...     return sum(float(((m(x) - model(x)) ** 2).mean()) for x in data)
    >>> q = esc.quantize(model, esc.QuantConfig(bits=8, budget=8), loop, error, progress=False)
    >>> len(q.esc_report.quantized_ops)
    2
    """
    return run_pipeline(model, config, forward_loop, objective, progress)


def save(qmodel, path):
    """Save the quantization state of ``qmodel`` (format ``esc_plugin.quantized/2``).

    The weights are not stored: ``load`` applies the state to the FP32 model,
    so the FP32 checkpoint stays the single source of weights. The file is
    written atomically and holds only tensors, numbers and strings.
    """
    plan = _plan_of(qmodel)
    call_sites = []
    for name, module in qmodel.named_modules():
        for site in getattr(module, "esc_sites", []):
            call_sites.append([name] + [list(v) if isinstance(v, tuple) else v for v in site])
    activations, weights = site_state(plan)
    esc_state = qmodel.__dict__.get("esc_state", {})
    state = {
        "format": FORMAT,
        "config": plan.config.to_dict(),
        "fp32_digest": esc_state.get("fp32_digest"),
        "call_sites": call_sites,
        "attention_sites": attention_sites(qmodel),
        "activations": activations,
        "weights": weights,
        "calibrator": esc_state.get("calibrator"),
        "transforms": esc_state.get("transforms", []),
        "report": qmodel.esc_report.to_dict() if hasattr(qmodel, "esc_report") else None,
    }
    torch_save(path, state)
    return path


def load(model, path):
    """Rebuild the quantized model from the FP32 ``model`` and a file written by :func:`save`."""
    state = read_state_file(path, "quantization file")
    fmt = state.get("format")
    if fmt not in READABLE_FORMATS:
        raise ConfigError(f"{path} is not an esc_plugin quantization file (written by esc.save); "
                          f"its format is {fmt!r}, readable are {', '.join(READABLE_FORMATS)}.")
    check_not_quantized(model)
    config = QuantConfig.from_dict(state["config"])
    v1 = fmt == READABLE_FORMATS[0]
    digest = None if v1 else state_digest(model)
    if not v1 and state.get("fp32_digest") and digest != state["fp32_digest"]:
        raise ConfigError(f"{path} was calibrated on different weights (SHA-256 of the FP32 state dict "
                          "differs): load it onto the FP32 checkpoint it was made from.")
    qmodel, plan = insert_quantizers(model, config)
    modules = dict(qmodel.named_modules())
    for name, pname, key, size, stride, offset in state["sites" if v1 else "call_sites"]:
        modules[name].esc_add_site(pname, key, tuple(size), tuple(stride), offset)
    for name in state.get("attention_sites", []):
        add_attention_site(modules[name], name, plan)
    by_name = {p.name: p for p in plan.points}
    activations = {k: {"amax": v} for k, v in state["amax"].items()} if v1 else state["activations"]
    missing = sorted(set(activations) ^ set(by_name))
    if missing:
        raise ConfigError(f"{path} does not match this model (quantized ops differ: {missing[:5]}...). "
                          "Load it onto the same FP32 model architecture it was calibrated on.")
    if v1 and abs(weights_sum_fingerprint(plan) - state["weights_fingerprint"]) > \
            1e-6 * max(abs(state["weights_fingerprint"]), 1.0):
        raise ConfigError(f"{path} was calibrated on different weights: load it onto the FP32 "
                          "checkpoint it was made from.")
    ctx = CalibrationContext(qmodel, plan, config, None, None, QuantReport(config=config.to_dict()), False)
    for entry in state.get("transforms", []):
        transform = get_transform(entry["name"]).cls(config)
        transform.load_state_dict(entry["state"], ctx)
    for name, entry in activations.items():
        q = by_name[name].input_quantizer
        if entry.get("pre_scale") is not None:
            q.set_pre_scale(entry["pre_scale"], q.pre_scale_axis)
        if entry["amax"] is None:
            by_name[name].unused = True
            q.disable()
        else:
            q.set_amax(entry["amax"])
    owners = dict(plan.weight_owners())
    for key, amax in state.get("weights", {}).items():
        name, attr = key.rsplit(":", 1)
        for a, wq in module_weight_quantizers(owners[name]):
            if a == attr:
                wq.amax = amax.clone()
    if state.get("report"):
        qmodel.__dict__["esc_report"] = QuantReport.from_dict(state["report"])
    qmodel.__dict__["esc_state"] = {"fp32_digest": digest or state.get("fp32_digest"),
                                    "calibrator": state.get("calibrator"),
                                    "transforms": state.get("transforms", [])}
    return qmodel


def _plan_of(qmodel):
    plan = qmodel.__dict__.get("esc_plan")
    if plan is None:
        raise CalibrationError("this model was never quantized: call esc.quantize(model, config, "
                               "forward_loop, objective) first and pass its result.")
    return plan


def report_of(qmodel):
    return _plan_of(qmodel) and qmodel.esc_report

