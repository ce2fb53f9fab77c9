"""Intel NNCF's ``nncf.quantize`` on the calibration inputs a forward loop makes: the peer rows.

Not an esc_plugin dependency (``pip install -e ".[peers]"``); the benchmark
tables and the SpeechBrain stage's ``quantize: nncf`` both run it, so the
peer is the same wherever it appears.

The inputs are captured from the task's own forward loop by hooks, so any
task works without exposing its data. A loop that calls the root module
gives one NNCF model; a loop that calls submodules instead (Whisper's task
calls the encoder, the decoder and the vocabulary projection; a SpeechBrain
recipe calls the modules of ``brain.modules`` one utterance at a time) gives
one NNCF model per outermost called submodule, each calibrated on its own
calls, put into one copy of the root. Quantizing the called module, not the
Python loop around it, matters: NNCF names traced ops by call order, so a
loop whose number of calls varies from batch to batch would give it a
different graph per batch.

Example (needs ``pip install nncf``; its first call compiles a C++ extension)::

    q = nncf_quantize(task.model, task.forward_loop)
    task.evaluate(q)
"""
import copy
import inspect
import os

import torch


def captured_calls(model, forward_loop):
    """``{module name: [call, ...]}`` of the outermost module calls ``forward_loop`` makes.

    "Outermost": made while no other module of ``model`` is running, so a
    submodule called from inside its parent is not listed. ``""`` is the root.
    Each call is a kwargs dict (positional arguments bound to their parameter
    names), its tensors detached and every value copied at call time (a cache
    the loop mutates later is kept as it was).
    """
    calls, active, handles = {}, [0], []

    def pre(name):
        def hook(mod, args, kwargs):
            if active[0] == 0:
                bound = inspect.signature(mod.forward).bind(*args, **kwargs)
                call = {k: v.detach() if torch.is_tensor(v) else v for k, v in bound.arguments.items()}
                calls.setdefault(name, []).append(copy.deepcopy(call))
            active[0] += 1
        return hook

    def post(mod, args, kwargs, output):
        active[0] -= 1

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise RuntimeError("the forward loop made no call to the model: nothing to calibrate NNCF on.")
    return calls


def captured_inputs(model, forward_loop):
    """The positional inputs of every root call that ``forward_loop`` makes (root calls only)."""
    root = captured_calls(model, forward_loop).get("")
    if not root:
        raise RuntimeError("the forward loop calls submodules, not the model itself: use captured_calls.")
    return [tuple(call.values()) for call in root]


class _Calls(torch.nn.Module):
    """``forward(...)`` = ``inner(...)``: a module NNCF can add its hook storage to."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _quantize_one(nncf, module, calls, subset_size, options):
    """``nncf.quantize`` of ``module`` (a copy the caller made) on its captured calls, as keywords."""
    if isinstance(module, (torch.nn.Sequential, torch.nn.ModuleDict, torch.nn.ModuleList)):
        # NNCF registers its hook storage as a child module, which a container whose forward runs its
        # children in turn would then call as a layer (torch's Sequential, SpeechBrain's Sequential:
        # a ModuleDict)
        module = _Calls(module)
    return nncf.quantize(module.eval(), nncf.Dataset(calls, dict), subset_size=subset_size or len(calls), **options)


def import_nncf():
    # NNCF compiles a C++ extension on its first torch call and gives up after 60 s by default,
    # which a loaded 2-core machine exceeds; a value the user set is kept
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    try:
        import nncf
    except ImportError as exc:
        raise ImportError("NNCF is not installed: pip install -e '.[peers]' (nncf==3.4.0).") from exc
    return nncf


def nncf_quantize(model, forward_loop, subset_size=None, select=None, **options):
    """``nncf.quantize`` (INT8) on a copy of ``model`` with the forward loop's inputs; FP32 model untouched.

    NNCF counts dataset items (here: the loop's calls); every one is used
    unless ``subset_size`` says otherwise. ``select(name, module)``, when
    given, says which outermost called submodules NNCF quantizes (the others
    stay float); ``options`` go to ``nncf.quantize``.
    """
    nncf = import_nncf()
    calls = captured_calls(model, forward_loop)
    quantized = copy.deepcopy(model).eval()  # the one copy: NNCF works on it, the FP32 model stays
    if "" in calls:
        return _quantize_one(nncf, quantized, calls[""], subset_size, options)
    for name, module_calls in calls.items():
        parent_name, _, attr = name.rpartition(".")
        parent = quantized.get_submodule(parent_name)
        if select is None or select(name, getattr(parent, attr)):
            setattr(parent, attr, _quantize_one(nncf, getattr(parent, attr), module_calls, subset_size, options))
    return quantized
