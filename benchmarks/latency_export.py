"""Export phase of the latency benchmark: FP32 ONNX, W8A8 QDQ ONNX, manifest.

Needs esc_plugin (modelopt), onnx and onnxruntime. For each model it writes,
under the export folder ``DIR/<name>/``:

* ``fp32.onnx``: the FP32 model, plain ``torch.onnx.export`` (TorchScript
  exporter, opset 17, dynamic batch axis, constant folding);
* ``int8_qdq.onnx``: the model quantized W8A8 by esc_plugin
  (``QuantConfig(bits=8, method="max")``: the scales do not change the speed),
  exported with ``esc_plugin.export.export_qdq_onnx`` (weights as float
  initializers -> QuantizeLinear -> DequantizeLinear, per output channel;
  activations Q/DQ per tensor);
* ``int8_weights.onnx``: the same graph with every weight QuantizeLinear
  evaluated and stored as an int8 initializer (weights -> DequantizeLinear
  only) and the graph compacted: ``esc_plugin.export.compact.int8_weight_layout``,
  which is what ``export_qdq_onnx`` does by default; its outputs are checked against
  ``int8_qdq.onnx`` in the measure phase;
* ``inputs.npy``: the real fixed-length inputs (``BenchModel.inputs``);

and ``DIR/manifest.json`` with, per model, the file names and sizes, the
quantization coverage and what ONNX Runtime makes of the INT8 graph after its
graph optimizations (``esc_plugin.export.integer_ops`` of
``ort_optimized_model``, the Q/DQ nodes left and which ops still read a
DequantizeLinear, i.e. run in float).
"""
import os
import platform
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from latency_models import build

QUANT_DEFAULTS = {"bits": 8, "method": "max"}


def export_fp32(spec, path):
    """Plain FP32 ONNX export (dynamic batch), written atomically."""
    from esc_plugin.core.io import atomic_path

    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.model, (spec.inputs[:1],), tmp, input_names=[spec.input_name],
                          output_names=[spec.output_name],
                          dynamic_axes={spec.input_name: {0: "batch"}, spec.output_name: {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    return path


def quantize_w8a8(spec, overrides=None):
    """W8A8 quantized copy of ``spec.model`` (esc_plugin, ``QuantConfig(bits=8, method="max")``
    plus the model's and the command line's ``overrides``)."""
    import esc_plugin as esc

    def forward_loop(model):
        with torch.no_grad():
            for batch in spec.calibration:
                model(batch)

    cfg = esc.QuantConfig(**{**QUANT_DEFAULTS, **spec.quant_config, **(overrides or {})})
    return esc.quantize(spec.model, cfg, forward_loop, progress=False)


def store_int8_weights(src, dst):
    """Rewrite ``src`` into the int8 layout ``export_qdq_onnx`` writes by default
    (``esc_plugin.export.compact.int8_weight_layout``: int8 weight initializers, compacted graph).
    Returns ``{"folded": n, "constants_shared": n, "weights_transposed": n,
    "float_initializers_left": [(name, shape), ...]}``.
    """
    import onnx

    from esc_plugin.core.io import atomic_path
    from esc_plugin.export.compact import int8_weight_layout

    model = onnx.load(src)
    layout = int8_weight_layout(model)
    entry = next((e for e in model.metadata_props if e.key == "esc_plugin.int8_weights"), None) \
        or model.metadata_props.add()
    entry.key, entry.value = "esc_plugin.int8_weights", "true"
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save(model, tmp)
    floats = sorted(((t.name, list(t.dims)) for t in model.graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) > 1024),
                    key=lambda item: -int(np.prod(item[1])))  # the largest first
    return {**layout, "float_initializers_left": floats}


def file_composition(path):
    """Bytes of an ONNX file by kind: int8 tensors, float tensors (initializers and Constant nodes), and
    the rest (nodes, names, shapes, metadata: the graph's structure, which INT8 does not shrink)."""
    import onnx

    model = onnx.load(path)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    by_type = Counter()
    for t in tensors:
        by_type[t.data_type] += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    int8 = by_type.pop(onnx.TensorProto.INT8, 0)
    other_tensors = sum(by_type.values())
    return {"int8_tensors": int(int8), "other_tensors": int(other_tensors),
            "graph_structure": int(os.path.getsize(path) - int8 - other_tensors)}


def ort_graph_report(path, optimized_path):
    """What ONNX Runtime (level "extended": QDQ fusions) makes of a QDQ graph."""
    import onnx

    from esc_plugin.export import integer_ops, op_counts, ort_optimized_model

    ort_optimized_model(path, optimized_path)
    model = onnx.load(optimized_path)
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers = Counter(n.op_type for n in model.graph.node if any(i in dq_out for i in n.input))
    counts = op_counts(model)
    return {"integer_ops": integer_ops(model),
            "qdq_left": {op: counts.get(op, 0) for op in ("QuantizeLinear", "DequantizeLinear")},
            "float_ops_reading_dequantize": dict(sorted(readers.items())),
            "op_counts": dict(sorted(counts.items()))}


def _git_commit():
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "esc_plugin"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (esc_plugin/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export_model(source, out_dir, shared_root=None, overrides=None):
    """Export one model (built-in name or ``module:function``); returns its manifest entry."""
    from esc_plugin.core.io import atomic_path

    t0 = time.perf_counter()
    spec = build(source, shared_root)
    folder = Path(out_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "inputs.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, spec.inputs.numpy().astype(np.float32))
    export_fp32(spec, folder / "fp32.onnx")
    qmodel = quantize_w8a8(spec, overrides)
    from esc_plugin.export import export_qdq_onnx

    export_qdq_onnx(qmodel, (spec.inputs[:1],), folder / "int8_qdq.onnx", [spec.input_name],
                    [spec.output_name], dynamic_axes={spec.input_name: {0: "batch"},
                                                      spec.output_name: {0: "batch"}},
                    int8_weights=False)  # the float-weight layout; int8_weights.onnx is the folded one
    rewrite = store_int8_weights(folder / "int8_qdq.onnx", folder / "int8_weights.onnx")
    graph = ort_graph_report(folder / "int8_qdq.onnx", folder / "int8_qdq.ort_optimized.onnx")
    report = qmodel.esc_report
    files = {"fp32": "fp32.onnx", "int8_qdq": "int8_qdq.onnx", "int8_weights": "int8_weights.onnx"}
    return {
        "name": spec.name, "source": source, "description": spec.description,
        "input_name": spec.input_name, "output_name": spec.output_name,
        "input_shape": list(spec.inputs.shape[1:]), "n_inputs": int(spec.inputs.shape[0]),
        "inputs": "inputs.npy", "files": files,
        "bytes": {k: os.path.getsize(folder / v) for k, v in files.items()},
        "quantization": {
            "config": {**QUANT_DEFAULTS, **spec.quant_config, **(overrides or {})},
            "calibration_samples": int(sum(len(b) for b in spec.calibration)),
            "quantized_ops": len(report.quantized_ops),
            "float_ops": [{k: c.get(k) for k in ("name", "op", "reason")} for c in report.float_ops],
        },
        "int8_weights_rewrite": rewrite,
        "composition": {k: file_composition(folder / files[k]) for k in ("fp32", "int8_weights")},
        "ort_int8_graph": graph,
        "export_seconds": round(time.perf_counter() - t0, 1),
    }


def export_all(sources, out_dir, shared_root=None, command="", overrides=None):
    """Export every model and write ``out_dir/manifest.json``; returns the manifest."""
    import onnx
    import onnxruntime

    from esc_plugin.core.io import write_json

    models = []
    for source in sources:
        print(f"[export] {source} ...", flush=True)
        entry = export_model(source, out_dir, shared_root, overrides)
        print(f"[export] {entry['name']}: {entry['bytes']} bytes, integer ops "
              f"{entry['ort_int8_graph']['integer_ops']} ({entry['export_seconds']} s)", flush=True)
        models.append(entry)
    try:
        from importlib.metadata import version
        modelopt = version("nvidia-modelopt")
    except Exception:  # noqa: BLE001 (version is informative only)
        modelopt = "unknown"
    manifest = {
        "command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "esc_plugin_commit": _git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "nvidia-modelopt": modelopt},
        "models": models,
    }
    write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest
