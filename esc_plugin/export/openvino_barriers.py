"""Fusion barriers: keep OpenVINO's CPU plugin from fusing a FakeQuantize where it computes it wrongly.

OpenVINO turns each ``QuantizeLinear -> DequantizeLinear`` pair of a QDQ ONNX
into a ``FakeQuantize`` and its low-precision transformations fuse that into
the ops around it. Some of those fusions give wrong numbers on the CPU plugin
(2026.4.1): the FakeQuantize after ``ReduceMean`` at the end of honk res8, the
one after the first ``Conv -> Transpose`` of the SpeechBrain Conformer's
front end. ONNX Runtime runs the same file correctly, and OpenVINO runs the
FP32 graph correctly, so it is the fusion, not the export.

A tensor that is also a model output cannot be fused away, so making the
float input of such a quantizer an extra output of the compiled model keeps
the quantizer where the file puts it, at the price of one copy of that
tensor. :func:`find_fusion_barriers` finds the fewest such tensors by
comparing OpenVINO with ONNX Runtime running every Q/DQ node as written
(graph rewrites off) on the given inputs, and bisecting over the inputs of
the activation quantizers; it returns ``[]`` when the graph already agrees.
:class:`~esc_plugin.export.openvino.OpenVinoRunner` takes them as
``fusion_barriers=`` (and returns the model's own outputs only), and
:func:`~esc_plugin.export.artifacts.write_openvino_ir` stores them in the IR
(extra results, listed in the model's ``rt_info`` under
:data:`RT_INFO_KEY`), so ``esc-quantize export --format openvino`` ships a
model that computes what the simulation computes.
"""
import numpy as np

from .errors import ExportError

#: ``model.get_rt_info()`` path under which an IR lists its barrier outputs (their tensor names).
RT_INFO_KEY = ["esc_plugin", "fusion_barriers"]

#: A subset of barriers "works" when its distance to ONNX Runtime is within this factor of the
#: distance with every candidate exposed (the int8 rounding differences left once nothing is fused).
WORKS_WITHIN = 1.5
#: Absolute slack on those distances (relative L2), so a graph that agrees to float rounding needs none.
SLACK = 1e-3


def candidates(onnx_model):
    """Float inputs of the activation ``QuantizeLinear`` nodes (not graph inputs, not weights)."""
    constants = {i.name for i in onnx_model.graph.initializer}
    constants |= {o for n in onnx_model.graph.node if n.op_type == "Constant" for o in n.output}
    graph_inputs = {i.name for i in onnx_model.graph.input}
    out = []
    for node in onnx_model.graph.node:
        x = node.input[0] if node.op_type == "QuantizeLinear" else None
        if x and x not in constants and x not in graph_inputs and x not in out:
            out.append(x)
    return out


def relative_l2(reference, outputs):
    """Largest relative L2 distance over the model outputs (0 for two zero outputs)."""
    worst = 0.0
    for r, o in zip(reference, outputs):
        r, o = np.asarray(r, dtype=np.float64), np.asarray(o, dtype=np.float64)
        norm = np.linalg.norm(r)
        worst = max(worst, float(np.linalg.norm(r - o) / norm) if norm else float(np.linalg.norm(o)))
    return worst


class _Probe:
    """OpenVINO vs literal ONNX Runtime on fixed inputs, for a given set of exposed tensors."""

    def __init__(self, onnx_path, inputs, device="CPU"):
        import onnx

        from .openvino import _numpy, import_openvino
        from .ort import _ort

        ort = _ort()
        self.ov = import_openvino()
        self.model = onnx.load(onnx_path)
        self.outputs = [o.name for o in self.model.graph.output]
        self.inputs = [[_numpy(x) for x in group] for group in inputs]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        self.reference = [session.run(None, dict(zip(names, group))) for group in self.inputs]
        self.core, self.device, self.compiles = self.ov.Core(), device, 0

    def distance(self, exposed):
        model = self.core.read_model(self.model.SerializeToString(), b"")
        if exposed:
            model.add_outputs(list(exposed))
        compiled = self.core.compile_model(model, self.device, {"INFERENCE_PRECISION_HINT": "f32"})
        self.compiles += 1
        worst = 0.0
        for group, ref in zip(self.inputs, self.reference):
            result = compiled(list(group))
            worst = max(worst, relative_l2(ref, [result[compiled.output(name)] for name in self.outputs]))
        return worst


def find_fusion_barriers(onnx_path, inputs, device="CPU"):
    """The fewest quantizer inputs to expose so OpenVINO computes what the QDQ file says.

    Arguments
    ---------
    onnx_path : str
        A QDQ ONNX (e.g. from :func:`~esc_plugin.export.export_qdq_onnx`).
    inputs : list of tuples
        Input groups to compare on (a few calibration batches).

    Returns
    -------
    dict
        ``{"barriers": [tensor names], "distance": before, "fixed_distance": after,
        "floor": with every candidate exposed, "agrees": bool, "compiles": n}``;
        ``barriers`` is ``[]`` when OpenVINO already agrees, and also when
        exposing does not help (then ``agrees`` is False and the caller says so).
    """
    probe = _Probe(onnx_path, inputs, device)
    before = probe.distance(())
    every = candidates(probe.model)
    floor = probe.distance(every) if every else before
    result = {"distance": before, "floor": floor, "barriers": [], "fixed_distance": before}
    works = lambda d: d <= WORKS_WITHIN * floor + SLACK  # noqa: E731
    if not works(before) and works(floor):
        barriers = _bisect(probe, every, [], works)
        result.update(barriers=barriers, fixed_distance=probe.distance(barriers))
    result.update(agrees=works(result["fixed_distance"]), compiles=probe.compiles)
    return result


def _bisect(probe, pool, kept, works):
    """Fewest of ``pool`` that, with ``kept`` exposed too, make ``works`` true (it does with all of pool)."""
    if len(pool) == 1:
        return list(pool)
    half = len(pool) // 2
    left, right = pool[:half], pool[half:]
    if works(probe.distance(kept + left)):
        return _bisect(probe, left, kept, works)
    if works(probe.distance(kept + right)):
        return _bisect(probe, right, kept, works)
    # Both halves hold a culprit: the fewest of each, with the other half's choice exposed.
    from_left = _bisect(probe, left, kept + right, works)
    return from_left + _bisect(probe, right, kept + from_left, works)


def check_barriers(model_outputs, barriers):
    """Barrier names must be tensors of the model other than its outputs (a clear error otherwise)."""
    clash = sorted(set(barriers) & set(model_outputs))
    if clash:
        raise ExportError(f"fusion_barriers {clash} are already outputs of the model: give the names of "
                          "internal tensors (find_fusion_barriers finds them).")
