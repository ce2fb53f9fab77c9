"""Peer quantizers for the benchmark tables (not esc_plugin dependencies).

``nncf_quantize(model, forward_loop)``: Intel NNCF's ``nncf.quantize`` (INT8,
default preset) on the same calibration inputs the esc_plugin rows use. The
inputs are captured from the task's own forward loop by a pre-hook on the
root module, so any task works without exposing its data.

Example (needs ``pip install nncf``; its first call compiles a C++ extension)::

    q = nncf_quantize(task.model, task.forward_loop)
    task.evaluate(q)
"""
import copy

import torch


def captured_inputs(model, forward_loop):
    """The positional inputs of every root call that ``forward_loop`` makes."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(a.detach() for a in args)))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError("the forward loop made no call to the model: nothing to calibrate NNCF on.")
    return calls


def nncf_quantize(model, forward_loop, subset_size=None, **options):
    """``nncf.quantize`` (INT8) on a copy of ``model`` with the forward loop's inputs; FP32 model untouched."""
    try:
        import nncf
    except ImportError as exc:
        raise SystemExit("NNCF is not installed: pip install -e '.[peers]' (nncf==3.4.0).") from exc
    inputs = captured_inputs(model, forward_loop)
    dataset = nncf.Dataset(inputs, lambda args: args[0] if len(args) == 1 else args)
    example = copy.deepcopy(model).eval()
    # NNCF counts dataset items (here: the loop's batches); use every one of them
    return nncf.quantize(example, dataset, subset_size=subset_size or len(inputs), **options)
