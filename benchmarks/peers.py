"""Peer quantizers for the benchmark tables (not esc_plugin dependencies).

``PEERS`` maps a row name to its :class:`Peer`: how it quantizes, at which
bit widths it runs, and the note its rows carry. Benchmarks read it instead
of a list of names.

``nncf_quantize(model, forward_loop)`` (:mod:`esc_plugin.nncf_peer`): Intel
NNCF's ``nncf.quantize`` (INT8, default preset) on the same calibration inputs
the esc_plugin rows use, captured from the task's own forward loop.

Example (needs ``pip install nncf``; its first call compiles a C++ extension)::

    q = nncf_quantize(task.model, task.forward_loop)
    task.evaluate(q)
"""
import copy
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_plugin.nncf_peer import captured_calls, captured_inputs, nncf_quantize  # noqa: E402,F401


class OpenVinoModule(torch.nn.Module):
    """A compiled OpenVINO model called like the torch model it came from (tensors in, first output out)."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    def forward(self, *inputs):
        out = self.compiled([x.detach().cpu().numpy() for x in inputs])[self.compiled.output(0)]
        return torch.from_numpy(out.copy())


def nncf_accuracy_control(model, forward_loop, objective, max_drop=0.01):
    """``nncf.quantize_with_accuracy_control`` (INT8, default preset): NNCF reverts the most
    sensitive quantizers to float until the task objective on the calibration batches is within
    ``max_drop`` (absolute) of FP32's; the result runs in OpenVINO on CPU.

    NNCF 3.4 implements accuracy control for OpenVINO and ONNX models only
    (a torch model raises ``UnsupportedBackendError``), so the FP32 model is
    converted with ``openvino.convert_model`` first: this is how an NNCF user
    gets it. ``objective`` (lower is better) is the validation metric, negated
    for NNCF (which expects higher is better). The loop must call the root
    module with tensors (a one-module model such as honk's).
    """
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise SystemExit("NNCF accuracy control needs nncf and openvino: pip install -e '.[peers,openvino]'.") from exc
    calls = captured_calls(model, forward_loop)
    if "" not in calls:
        raise RuntimeError(f"the forward loop calls {sorted(calls)}, not the model itself: NNCF accuracy "
                           "control converts one model to OpenVINO, so it needs root calls.")
    inputs = [tuple(call.values()) for call in calls[""]]
    ov_model = ov.convert_model(copy.deepcopy(model).eval(), example_input=inputs[0])
    dataset = nncf.Dataset(inputs, lambda args: [a.numpy() for a in args])

    def validate(compiled, _items):  # the objective runs the whole calibration loop itself
        with torch.no_grad():
            return -float(objective(OpenVinoModule(compiled)))

    quantized = nncf.quantize_with_accuracy_control(ov_model, dataset, dataset, validation_fn=validate,
                                                    max_drop=max_drop, subset_size=len(inputs))
    return OpenVinoModule(ov.Core().compile_model(quantized, "CPU"))


@dataclass(frozen=True)
class Peer:
    """A peer quantizer row: ``quantize(model, forward_loop, objective) -> model``, the bit widths it runs at,
    the note its rows carry and the package (with its install command) it needs."""

    quantize: Callable
    bits: Tuple[int, ...]
    note: str
    package: str
    install: str


PEERS = {
    "nncf": Peer(lambda model, loop, objective: nncf_quantize(model, loop), (8,),
                 "Intel NNCF nncf.quantize, INT8 default preset, same calibration batches",
                 "nncf", "pip install -e '.[peers]' (nncf==3.4.0)"),
    "nncf_ac": Peer(nncf_accuracy_control, (8,),
                    "Intel NNCF nncf.quantize_with_accuracy_control (max_drop 0.01 absolute on the task objective "
                    "of the calibration batches), through OpenVINO (NNCF 3.4 has no accuracy control for torch "
                    "models), run by OpenVINO on CPU", "nncf", "pip install -e '.[peers]' (nncf==3.4.0)"),
}


def missing_peer_packages(peers):
    """A message naming what to install for every peer in ``peers`` whose package is absent ('' if none)."""
    missing = [f"{name} needs {peer.package}: {peer.install}" for name, peer in peers.items()
               if importlib.util.find_spec(peer.package) is None]
    return "; ".join(missing)
