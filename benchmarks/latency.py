"""Paper Table 3 analogue: FP32 vs INT8 latency and file size on real models (issue #4).

Backends, per model, batch size and intra-op thread count:

* ``pytorch_fp32``: the FP32 ``torch.nn.Module``, eager, ``torch.inference_mode``;
* ``ort_fp32``: ONNX Runtime on the plain FP32 ONNX export;
* ``ort_int8``: ONNX Runtime on esc_plugin's W8A8 QDQ export with float weight
  initializers (``export_qdq_onnx(..., int8_weights=False)``); graph
  optimizations on (``ORT_ENABLE_ALL``), so the QDQ groups run as integer kernels;
* ``ort_int8_weights``: the same graph with the weights stored as int8
  initializers (``export_qdq_onnx``'s default, ``fold_weight_quantizers``);
* ``ov_fp32`` / ``ov_int8``: OpenVINO (CPU plugin, f32 inference precision) on
  the FP32 export and on the default INT8 export (``int8_weights.onnx``), via
  ``esc_plugin.export.openvino.OpenVinoRunner``; which compute layers it runs
  in int8 is read from the compiled model (``int8_compute_ops``);
* ``trt_fp32`` / ``trt_int8``: TensorRT engines built with
  ``esc_plugin.export.build_engine`` where ``tensorrt`` imports (and a GPU is
  there); otherwise the results say why not.

Two phases, so that the measuring machine needs neither modelopt nor onnx::

    # 1. export (needs esc_plugin, modelopt, onnx, onnxruntime, ../shared)
    python benchmarks/latency.py --export-only --out runs/latency
    # 2. measure (needs onnxruntime and numpy; torch for the PyTorch row)
    python benchmarks/latency.py --measure runs/latency --threads 1 --repeats 10 \
        --results benchmarks/results/latency
    # or both at once
    python benchmarks/latency.py --out runs/latency --results benchmarks/results/latency

Timing: every backend runs ``--warmup`` times, then ``--repeats`` rounds in
which each backend runs once, in an order rotated every round (so a change of
machine load hits all backends alike); median and p90 of the per-run wall time
(``time.perf_counter`` around one ``session.run`` / forward, input already in
memory). ORT sessions: ``intra_op_num_threads`` = ``--threads``, one inter-op
thread, sequential execution; the PyTorch row uses ``torch.set_num_threads``.
One extra ORT session per backend with profiling on gives the time per op type
(batch 1, first thread count; median over the profiled runs per node), to see
which ops run as integer kernels and where the INT8 time goes.

More models: ``--model package.module:function`` (see ``latency_models.py``).
Writes ``results.json`` and ``results.md`` (atomically) to ``--results``.
"""
import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "latency"
DEFAULT_MODELS = ["whisper_encoder", "honk"]
LABELS = {
    "pytorch_fp32": "PyTorch FP32 (eager)",
    "ort_fp32": "ORT FP32 (plain export)",
    "ort_int8": "ORT INT8 (QDQ, float weight initializers)",
    "ort_int8_weights": "ORT INT8 (QDQ, int8 weight initializers: esc_plugin default)",
    "ov_fp32": "OpenVINO FP32",
    "ov_int8": "OpenVINO INT8 (esc_plugin default export)",
    "trt_fp32": "TensorRT (FP32 ONNX)",
    "trt_int8": "TensorRT (INT8 QDQ ONNX)",
}
ORT_FILES = {"ort_fp32": "fp32", "ort_int8": "int8_qdq", "ort_int8_weights": "int8_weights"}
OV_FILES = {"ov_fp32": "fp32", "ov_int8": "int8_weights"}
#: (INT8 backend, its own FP32 backend) per runtime, for the issue's "INT8 vs its own FP32" targets.
OWN_FP32 = {"ort_int8": "ort_fp32", "ort_int8_weights": "ort_fp32", "ov_int8": "ov_fp32", "ov_fp32": "ov_fp32",
            "ort_fp32": "ort_fp32"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


# ------------------------------------------------------------------ helpers

def write_atomic(path, text):
    """Write ``text`` to ``path`` through a temp file + ``os.replace``.

    The same as ``esc_plugin.core.io.write_bytes``, kept here because the
    measure phase runs without torch (``--measure ... --no-torch``: onnxruntime
    and numpy only) and ``esc_plugin.core.io`` imports torch when imported.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_integer_kernel(op):
    """ORT ops that compute in integer arithmetic (QLinear*, *Integer*, QGemm, QAttention...)."""
    return op.startswith("QLinear") or "Integer" in op or op in {"QGemm", "QAttention",
                                                                   "DynamicQuantizeMatMul"}


def describe_machine(load_note=""):
    """CPU model, logical CPUs, int8-relevant ISA flags, load average, library versions."""
    cpu, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu is None:
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    cpu = cpu or platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("onnxruntime", "torch"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    try:
        from esc_plugin.export import int8_kernels_exact

        exact = bool(int8_kernels_exact())
    except ImportError:  # onnxruntime missing
        exact = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "isa": [f for f in wanted if f in flags], "platform": platform.platform(),
            "ort_int8_kernels_exact": exact,
            "load_average_start": [round(v, 2) for v in os.getloadavg()],
            "load_note": load_note, "versions": versions}


def batch_of(inputs, size):
    """The first ``size`` samples (cycled when fewer are stored), C-contiguous float32."""
    idx = np.arange(size) % len(inputs)
    return np.ascontiguousarray(inputs[idx], dtype=np.float32)


def stats(times_ms):
    t = np.asarray(times_ms)
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(t.mean()), "min_ms": float(t.min()), "runs": int(t.size)}


def time_interleaved(runners, warmup, repeats, desc="", min_seconds=0.0, max_repeats=1000):
    """``{name: [ms, ...]}``: warm-up, then rotated rounds of one run per backend: ``repeats``
    rounds, more (up to ``max_repeats``) while the rounds took less than ``min_seconds`` in all."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    progress = None
    try:
        from tqdm import tqdm
        progress = tqdm(desc=desc, unit="round", leave=False, disable=None)
    except ImportError:
        pass
    times = {name: [] for name in names}
    start, r = time.perf_counter(), 0
    while r < repeats or (time.perf_counter() - start < min_seconds and r < max_repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    return times


# ------------------------------------------------------------------ backends

def ort_session(path, threads, profile_prefix=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # the QDQ graph's unused zero-point constants only cause warnings
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def openvino_runners(folder, entry, threads):
    """``({backend: OpenVinoRunner}, None)`` or ``({}, reason)`` when OpenVINO cannot run here."""
    try:
        from esc_plugin.export.openvino import OpenVinoRunner
        return {b: OpenVinoRunner(folder / entry["files"][f], threads=threads) for b, f in OV_FILES.items()}, None
    except Exception as exc:  # noqa: BLE001 (recorded as the rows' skip reason)
        return {}, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def rebuild_torch_model(entry, shared_root):
    """(model, None) or (None, reason): the FP32 module, rebuilt from its builder."""
    try:
        for folder in (str(HERE), str(HERE.parent)):  # latency_models; the repository's esc_plugin
            if folder not in sys.path:
                sys.path.insert(0, folder)
        from latency_models import build
        return build(entry["source"], shared_root).model, None
    except Exception as exc:  # noqa: BLE001 (any failure only skips the PyTorch row)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def tensorrt_status():
    """``{"available": bool, ...}``: tensorrt, a CUDA GPU and esc_plugin.export's builder."""
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "reason": f"import tensorrt failed ({type(exc).__name__}: {exc})"}
    version = getattr(tensorrt, "__version__", "?")
    try:
        import torch
        if not torch.cuda.is_available():
            return {"available": False, "reason": f"tensorrt {version} imports but there is no CUDA GPU"}
        from esc_plugin.export import TrtRunner, build_engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return {"available": False,
                "reason": f"tensorrt {version} imports but {type(exc).__name__}: {exc}"}
    return {"available": True, "version": version, "gpu": torch.cuda.get_device_name()}


def tensorrt_rows(entry, folder, inputs, batch_sizes, warmup, repeats, min_seconds=0.0):
    """TensorRT FP32 / INT8 rows (one engine per batch size: min = opt = max shape)."""
    import torch
    from esc_plugin.export import TrtRunner, build_engine

    rows = []
    for b in batch_sizes:
        x = torch.from_numpy(batch_of(inputs, b)).cuda()
        runners, failed = {}, {}
        for backend, key in (("trt_fp32", "fp32"), ("trt_int8", "int8_qdq")):
            shape = tuple(x.shape)
            try:
                engine = build_engine(folder / entry["files"][key], folder / f"{backend}_b{b}.engine",
                                      {entry["input_name"]: (shape, shape, shape)})
                runner = TrtRunner(engine)
                runners[backend] = lambda r=runner: r(x)
            except Exception as exc:  # noqa: BLE001 (recorded in the results)
                failed[backend] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        times = (time_interleaved(runners, warmup, repeats, f"{entry['name']} TensorRT b{b}", min_seconds)
                 if runners else {})
        for backend in ("trt_fp32", "trt_int8"):
            row = {"model": entry["name"], "backend": backend, "batch": b, "threads": None}
            row.update(stats(times[backend]) if backend in times else {"skipped": failed[backend]})
            rows.append(row)
    return rows


# ------------------------------------------------------------------ profile

def profile_ort(path, feeds, threads, runs, min_seconds=2.0, max_runs=200):
    """Kernel time per run by op type, from ORT's profiler.

    One warm-up run, then ``runs`` profiled runs, more (up to ``max_runs``) for
    fast models until about ``min_seconds``. Each node's time is the median
    over the runs (robust to preemption on a shared machine); the op type's
    time is the sum over its nodes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, threads, Path(tmp) / "profile")
        t0 = time.perf_counter()
        session.run(None, feeds)
        once = max(time.perf_counter() - t0, 1e-4)
        runs = max(runs, min(max_runs, int(min_seconds / once)))
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff = run_events[0]["ts"] + run_events[0]["dur"] if run_events else 0
    per_node, op_of = defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff:
            per_node[e["name"]].append(e["dur"] / 1e3)
            op_of[e["name"]] = e.get("args", {}).get("op_name", "?")
    per_op, count = defaultdict(float), defaultdict(int)
    for node, durations in per_node.items():
        per_op[op_of[node]] += float(np.median(durations))
        count[op_of[node]] += 1
    ops = {op: {"ms": round(ms, 3), "nodes": count[op]}
           for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}
    total = sum(per_op.values())
    integer = sum(ms for op, ms in per_op.items() if is_integer_kernel(op))
    qdq = sum(ms for op, ms in per_op.items() if op in QDQ_OPS)
    return {"runs": runs, "kernel_ms": round(total, 3), "integer_kernel_ms": round(integer, 3),
            "qdq_ms": round(qdq, 3), "float_ms": round(total - integer - qdq, 3), "ops": ops}


# ------------------------------------------------------------------ measure

def _errors(ref, got):
    d = got.astype(np.float64) - ref
    return {"max_abs": float(np.abs(d).max()),
            "rel_l2": float(np.linalg.norm(d) / max(np.linalg.norm(ref), 1e-30))}


def measure_model(entry, folder, threads_list, batch_sizes, warmup, repeats, use_torch, shared_root,
                  profile_runs, min_seconds=0.0):
    """Rows, output checks and profiles of one exported model."""
    inputs = np.load(folder / entry["inputs"])
    torch_model, torch_reason = (None, "disabled (--no-torch)")
    if use_torch:
        torch_model, torch_reason = rebuild_torch_model(entry, shared_root)
    rows, checks, ov_info = [], [], {}
    for threads in threads_list:
        sessions = {b: ort_session(folder / entry["files"][f], threads) for b, f in ORT_FILES.items()}
        ov, ov_reason = openvino_runners(folder, entry, threads)
        if ov and not ov_info:
            from esc_plugin.export.openvino import int8_compute_ops
            ov_info = {"int8_compute_ops": int8_compute_ops(ov["ov_int8"])}
        elif ov_reason:
            ov_info = {"skipped": ov_reason}
        if torch_model is not None:
            import torch
            torch.set_num_threads(threads)
        for b in batch_sizes:
            x = batch_of(inputs, b)
            feeds = {entry["input_name"]: x}
            runners = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
            runners.update({name: (lambda r=r: r(x)) for name, r in ov.items()})
            outs = {name: run()[0] for name, run in runners.items()}
            if torch_model is not None:
                import torch
                xt = torch.from_numpy(x)

                def run_torch(m=torch_model, xt=xt):
                    with torch.inference_mode():
                        return m(xt)
                runners = {"pytorch_fp32": run_torch, **runners}
                outs["pytorch_fp32"] = run_torch().numpy()
            check = {"batch": b, "threads": threads,
                     "ort_int8_vs_ort_fp32": _errors(outs["ort_fp32"], outs["ort_int8"]),
                     "ort_int8_weights_vs_ort_int8": _errors(outs["ort_int8"], outs["ort_int8_weights"])}
            if "pytorch_fp32" in outs:
                check["ort_fp32_vs_pytorch_fp32"] = _errors(outs["pytorch_fp32"], outs["ort_fp32"])
            if ov:
                check["ov_fp32_vs_ort_fp32"] = _errors(outs["ort_fp32"], outs["ov_fp32"])
                check["ov_int8_vs_ort_int8"] = _errors(outs["ort_int8_weights"], outs["ov_int8"])
            checks.append(check)
            load_before = os.getloadavg()[0]
            times = time_interleaved(runners, warmup, repeats, f"{entry['name']} b{b} t{threads}",
                                     min_seconds)
            for backend in ["pytorch_fp32", *ORT_FILES, *OV_FILES]:
                row = {"model": entry["name"], "backend": backend, "batch": b, "threads": threads}
                if backend in times:
                    row.update(stats(times[backend]))
                    row["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                else:
                    row["skipped"] = ov_reason if backend in OV_FILES else torch_reason
                rows.append(row)
    profiles = {}
    if profile_runs > 0:
        feeds = {entry["input_name"]: batch_of(inputs, 1)}
        for backend, key in ORT_FILES.items():
            if backend != "ort_int8_weights":
                profiles[backend] = profile_ort(folder / entry["files"][key], feeds, threads_list[0],
                                                profile_runs, min_seconds=min(2.0, min_seconds))
        profiles["batch"], profiles["threads"] = 1, threads_list[0]
    profiles["openvino"] = ov_info
    return rows, checks, profiles, torch_reason


def add_speedups(rows):
    """``speedup_vs_fp32`` = median(ort_fp32) / median(backend), same model/batch/threads
    (TensorRT rows: median(trt_fp32) / median(backend))."""
    ref = {(r["model"], r["batch"], r["threads"]): r["median_ms"] for r in rows
           if r["backend"] == "ort_fp32" and "median_ms" in r}
    for r in rows:
        base = ref.get((r["model"], r["batch"], r["threads"]))
        if base is None and r["threads"] is None:  # TensorRT: against its own FP32 engine
            base = next((x.get("median_ms") for x in rows if x["backend"] == "trt_fp32"
                         and x["model"] == r["model"] and x["batch"] == r["batch"]), None)
        if base and "median_ms" in r:
            r["speedup_vs_fp32"] = round(base / r["median_ms"], 3)
        own = next((x.get("median_ms") for x in rows if x["backend"] == OWN_FP32.get(r["backend"])
                    and x["model"] == r["model"] and x["batch"] == r["batch"]
                    and x["threads"] == r["threads"]), None)
        if own and "median_ms" in r:
            r["speedup_vs_own_fp32"] = round(own / r["median_ms"], 3)
    return rows


def targets(manifest, rows):
    """The issue's targets, per model: ORT INT8 >= 1.5x ORT FP32; INT8 file <= 0.3x FP32 file."""
    out = {}
    for entry in manifest["models"]:
        sizes = entry["bytes"]
        speed = {f"batch {r['batch']}, {r['threads']} threads": r["speedup_vs_fp32"] for r in rows
                 if r["model"] == entry["name"] and r["backend"] == "ort_int8_weights" and "speedup_vs_fp32" in r}
        best = {}
        for r in rows:
            if r["model"] == entry["name"] and r["backend"] in ("ort_int8_weights", "ov_int8") \
                    and "speedup_vs_own_fp32" in r:
                key = f"batch {r['batch']}, {r['threads']} threads"
                if r["speedup_vs_own_fp32"] > best.get(key, (0, ""))[0]:
                    best[key] = (r["speedup_vs_own_fp32"], LABELS[r["backend"]].split(" (")[0])
        needed = {k: (2.0 if k.startswith("batch 8") else 1.5) for k in best}
        out[entry["name"]] = {
            "ort_int8_speedup": speed,
            "ort_int8_speedup_met": bool(speed) and min(speed.values()) >= 1.5,
            "best_int8_vs_own_fp32": {k: {"speedup": v, "runtime": n, "needed": needed[k], "met": v >= needed[k]}
                                      for k, (v, n) in best.items()},
            "file_ratio_int8_qdq": round(sizes["int8_qdq"] / sizes["fp32"], 3),
            "file_ratio_int8_weights": round(sizes["int8_weights"] / sizes["fp32"], 3),
            "file_ratio_met_by_esc_plugin_export": sizes["int8_weights"] <= 0.3 * sizes["fp32"],
        }
    return out


def measure(export_dir, results_dir, threads_list=(1,), batch_sizes=(1, 8), warmup=2, repeats=10,
            models=None, use_torch=True, shared_root=None, profile_runs=3, command="", load_note="",
            min_seconds=0.0):
    """Measure every model of ``export_dir/manifest.json``; write results.json / results.md."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{manifest_path} not found: run the export phase first "
                         f"(python benchmarks/latency.py --export-only --out {export_dir}).")
    manifest = json.loads(manifest_path.read_text())
    if models:
        unknown = sorted(set(models) - {m["name"] for m in manifest["models"]})
        if unknown:
            raise SystemExit(f"--models {unknown} are not in {manifest_path} "
                             f"({[m['name'] for m in manifest['models']]}).")
        manifest["models"] = [m for m in manifest["models"] if m["name"] in models]
    machine = describe_machine(load_note)
    trt = tensorrt_status()
    torch_threads = None
    try:
        import torch
        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    rows, checks, profiles, torch_skips = [], {}, {}, {}
    t0 = time.perf_counter()
    try:
        for entry in manifest["models"]:
            folder = export_dir / entry["name"]
            print(f"[measure] {entry['name']} ...", flush=True)
            r, c, p, reason = measure_model(entry, folder, list(threads_list), list(batch_sizes), warmup,
                                            repeats, use_torch, shared_root, profile_runs, min_seconds)
            rows += r
            checks[entry["name"]], profiles[entry["name"]] = c, p
            if any(x.get("skipped") for x in r):
                torch_skips[entry["name"]] = reason
            if trt["available"]:
                rows += tensorrt_rows(entry, folder, np.load(folder / entry["inputs"]), batch_sizes,
                                      warmup, repeats, min_seconds)
    finally:
        if torch_threads is not None:
            import torch
            torch.set_num_threads(torch_threads)
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    add_speedups(rows)
    results = {
        "command": command, "export_command": manifest.get("command", ""),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "measure_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine,
        "settings": {"threads": list(threads_list), "inter_op_threads": 1, "batch_sizes": list(batch_sizes),
                     "warmup": warmup, "repeats": repeats, "min_seconds": min_seconds,
                     "ort_graph_optimization": "ORT_ENABLE_ALL", "profile_runs": profile_runs,
                     "timing": "interleaved rotated rounds, perf_counter"},
        "export": {k: manifest.get(k) for k in ("created", "esc_plugin_commit", "versions")},
        "tensorrt": trt, "pytorch_skipped": torch_skips,
        "models": {m["name"]: {k: m[k] for k in ("description", "source", "input_shape", "bytes", "files",
                                                 "quantization", "int8_weights_rewrite", "composition",
                                                 "ort_int8_graph") if k in m}
                   for m in manifest["models"]},
        "rows": rows, "output_checks": checks, "profiles": profiles,
        "targets": targets(manifest, rows),
    }
    results_dir = Path(results_dir)
    write_atomic(results_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(results_dir / "results.md", markdown(results))
    return results


# ------------------------------------------------------------------ report

def _mb(n):
    return f"{n / 1e6:.2f}"


def _header(res):
    m, s, trt = res["machine"], res["settings"], res["tensorrt"]
    trt_text = (f"available ({trt['version']}, {trt['gpu']})" if trt["available"]
                else f"not available ({trt['reason']})")
    lines = ["# Latency and size: FP32 vs INT8 (paper Table 3 analogue)", ""]
    if res["export_command"] and res["export_command"] != res["command"]:
        lines += [f"Export: `{res['export_command']}`  ", f"Measure: `{res['command']}`", ""]
    else:
        lines += [f"Produced by `{res['command']}`", ""]
    return lines + [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), ISA "
        f"{', '.join(m['isa']) or 'none of avx2/avx512/vnni/amx'}; {m['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".  ",
        f"Load average (1/5/15 min) {m['load_average_start']} at start, {m['load_average_end']} at end"
        + (f"; {m['load_note']}" if m["load_note"] else "") + ".  ",
        f"Timing: median and p90 over the runs of each backend ({s['repeats']} or more, until a setting "
        f"took {s['min_seconds']:g} s; 'runs' column) after {s['warmup']} warm-up runs, backends "
        f"interleaved (rotated order each round); intra-op threads {s['threads']} (ORT "
        "`intra_op_num_threads`, `torch.set_num_threads`), 1 inter-op thread; ORT graph optimization "
        f"`{s['ort_graph_optimization']}`, CPUExecutionProvider. Fixed-length inputs (real features). "
        "'speedup' = median(ORT FP32) / median(backend) on the CPU rows, median(TensorRT FP32) / "
        "median(backend) on the GPU rows.",
        "", f"TensorRT: {trt_text}.", ""]


def _latency_table(name, rows):
    lines = ["| batch | threads | backend | median ms | p90 ms | runs | speedup vs ORT FP32 | vs own FP32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["model"] == name):
        head = f"| {r['batch']} | {r['threads'] or 'GPU'} | {LABELS[r['backend']]} |"
        if "median_ms" in r:
            speed = f"{r['speedup_vs_fp32']:.2f}×" if "speedup_vs_fp32" in r else "-"
            own = f"{r['speedup_vs_own_fp32']:.2f}×" if "speedup_vs_own_fp32" in r else "-"
            lines.append(f"{head} {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['runs']} | {speed} | {own} |")
        else:
            lines.append(f"{head} skipped: {r['skipped']} | | | | |")
    return lines


def _size_table(info):
    b, f = info["bytes"], info["files"]
    return ["| ONNX file | MB | × FP32 |", "|---|---|---|",
            f"| FP32 (`{f['fp32']}`) | {_mb(b['fp32'])} | 1.00 |",
            f"| INT8 QDQ, float weight initializers (`{f['int8_qdq']}`) | {_mb(b['int8_qdq'])} | "
            f"{b['int8_qdq'] / b['fp32']:.2f} |",
            f"| INT8 QDQ, int8 weight initializers, esc_plugin default (`{f['int8_weights']}`) | "
            f"{_mb(b['int8_weights'])} | "
            f"{b['int8_weights'] / b['fp32']:.2f} |"]


def _composition(info):
    c = info.get("composition")
    if not c:
        return []
    fp32, int8 = c["fp32"], c["int8_weights"]
    tensors = int8["int8_tensors"] + int8["other_tensors"]
    fp32_tensors = fp32["int8_tensors"] + fp32["other_tensors"]
    return [f"* Where the bytes are: FP32 file {_mb(fp32_tensors)} MB of tensors + {_mb(fp32['graph_structure'])} MB "
            f"of graph structure (nodes, names, shapes); INT8 file {_mb(int8['int8_tensors'])} MB int8 tensors + "
            f"{_mb(int8['other_tensors'])} MB float tensors (biases, scales, tables left in float) + "
            f"{_mb(int8['graph_structure'])} MB of graph structure (with the Q/DQ nodes). Tensors alone: "
            f"{tensors / fp32_tensors:.2f}× FP32's."]


def _facts(t, info):
    g, q = info["ort_int8_graph"], info["quantization"]
    speeds = ", ".join(f"{k}: {v:.2f}×" for k, v in t["ort_int8_speedup"].items()) or "not measured"
    float_ops = sorted({o["op"] for o in q["float_ops"]})
    best = ", ".join(f"{k}: {v['runtime']} {v['speedup']:.2f}× (needs {v['needed']:g}×, "
                     f"{'met' if v['met'] else 'not met'})" for k, v in t.get("best_int8_vs_own_fp32", {}).items())
    lines = [
        f"* Target best INT8 CPU runtime vs its own FP32 (≥ 2× at batch 8, ≥ 1.5× at batch 1): "
        f"{best or 'not measured'}.",
        f"* Earlier target ORT INT8 (default export) ≥ 1.5× ORT FP32: {'met' if t['ort_int8_speedup_met'] else 'not met'} "
        f"({speeds}).",
        f"* Target INT8 file ≤ 0.3× FP32: esc_plugin's default export (int8 weight initializers) "
        f"{t['file_ratio_int8_weights']:.2f}× "
        f"({'met' if t['file_ratio_met_by_esc_plugin_export'] else 'not met'}"
        + (f"; largest float tables left: {', '.join(n for n, _ in info['int8_weights_rewrite']['float_initializers_left'][:3])}"
           if info.get("int8_weights_rewrite", {}).get("float_initializers_left") else "")
        + f"); float weight initializers {t['file_ratio_int8_qdq']:.2f}×.",
        *_composition(info),
        f"* Quantization: W8A8 `{q['config']}` on {q['calibration_samples']} calibration samples; "
        f"{q['quantized_ops']} ops quantized, {len(q['float_ops'])} left in float"
        + (f" ({', '.join(float_ops)})" if float_ops else "") + ".",
        f"* ORT-optimized INT8 graph: integer kernels {g['integer_ops']}; Q/DQ nodes left {g['qdq_left']}; "
        f"float ops reading a DequantizeLinear (quantized input, float kernel) "
        f"{g['float_ops_reading_dequantize'] or 'none'}.",
    ]
    if not g["integer_ops"]:
        lines.append("* No integer kernel runs in the ORT INT8 graph: any speed difference from ORT FP32 "
                     "comes from the float kernels and layouts ORT picks for each graph (see the profile).")
    return lines


def _profile_lines(p):
    fp, i8 = p["ort_fp32"], p["ort_int8"]
    bound = fp["kernel_ms"] / i8["float_ms"] if i8["float_ms"] else float("inf")
    lines = [
        f"* ORT profile (batch {p['batch']}, {p['threads']} thread(s), {fp['runs']} / {i8['runs']} runs, "
        f"median kernel time per node, summed): FP32 {fp['kernel_ms']:.2f} ms; INT8 {i8['kernel_ms']:.2f} ms "
        f"= integer kernels {i8['integer_kernel_ms']:.2f} + Q/DQ {i8['qdq_ms']:.2f} + float ops "
        f"{i8['float_ms']:.2f}. The float ops alone bound the INT8 speedup at {bound:.2f}× (FP32 kernel "
        "time / INT8 float-op time, as if integer kernels and Q/DQ cost nothing).",
        "", "| op type (ORT kernel) | FP32 ms (nodes) | INT8 ms (nodes) |", "|---|---|---|"]

    def cell(ops, op):
        return f"{ops[op]['ms']:.2f} ({ops[op]['nodes']})" if op in ops else "-"

    def weight(op):
        return -max(fp["ops"].get(op, {}).get("ms", 0), i8["ops"].get(op, {}).get("ms", 0))

    for op in sorted(set(fp["ops"]) | set(i8["ops"]), key=weight):
        tag = " (integer)" if is_integer_kernel(op) else ""
        lines.append(f"| {op}{tag} | {cell(fp['ops'], op)} | {cell(i8['ops'], op)} |")
    return lines


def _check_line(checks, exact=None):
    def worst(key, field):
        return max(x[key][field] for x in checks if key in x)

    text = (f"Output checks (all batches): ORT INT8 vs ORT FP32 rel. L2 ≤ "
            f"{worst('ort_int8_vs_ort_fp32', 'rel_l2'):.3g} (the W8A8 error of this max-calibrated model; "
            f"accuracy is Table 1's business); int8 vs float weight initializers max |diff| "
            f"{worst('ort_int8_weights_vs_ort_int8', 'max_abs'):.3g}")
    if any("ort_fp32_vs_pytorch_fp32" in x for x in checks):
        text += f"; ORT FP32 vs PyTorch rel. L2 ≤ {worst('ort_fp32_vs_pytorch_fp32', 'rel_l2'):.3g}"
    if any("ov_int8_vs_ort_int8" in x for x in checks):
        text += (f"; OpenVINO FP32 vs ORT FP32 rel. L2 ≤ {worst('ov_fp32_vs_ort_fp32', 'rel_l2'):.3g}, OpenVINO "
                 f"INT8 vs ORT INT8 ≤ {worst('ov_int8_vs_ort_int8', 'rel_l2'):.3g}")
        text += {True: " (ORT's fused int8 kernels are exact on this CPU: esc_plugin.export.int8_kernels_exact())",
                 False: " (ORT's fused int8 kernels saturate on this CPU, AVX2 without VNNI: "
                        "esc_plugin.export.int8_kernels_exact())",
                 None: " (ORT's fused int8 kernels saturate on AVX2 CPUs without VNNI: "
                       "esc_plugin.export.int8_kernels_exact())"}[exact]
    return text + "."


def markdown(res):
    """results.md: command, machine, then per model the latency table, file sizes and analysis facts."""
    lines = _header(res)
    for name, info in res["models"].items():
        lines += [f"## {name}", "", info["description"], ""] + _latency_table(name, res["rows"])
        lines += [""] + _size_table(info) + [""] + _facts(res["targets"][name], info)
        ov = res["profiles"].get(name, {}).get("openvino", {})
        if ov.get("int8_compute_ops"):
            lines.append(f"* OpenVINO INT8 compiled model, compute layers in int8 / float: {ov['int8_compute_ops']}.")
        elif ov.get("skipped"):
            lines.append(f"* OpenVINO rows skipped: {ov['skipped']}.")
        if "ort_fp32" in res["profiles"].get(name, {}):
            lines += _profile_lines(res["profiles"][name])
        lines += ["", _check_line(res["output_checks"][name], res["machine"].get("ort_int8_kernels_exact")), ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ CLI

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="export folder (export phase): ONNX files, inputs, manifest.json")
    p.add_argument("--export-only", action="store_true", help="stop after the export phase")
    p.add_argument("--measure", metavar="DIR", help="measure an existing export folder (no export)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="where results.json / results.md go")
    p.add_argument("--models", nargs="*", help=f"built-in models to export ({', '.join(DEFAULT_MODELS)}; "
                   "default all), or with --measure the manifest names to measure")
    p.add_argument("--model", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="extra model builder (see benchmarks/latency_models.py); repeatable")
    p.add_argument("--shared", help="shared data folder (default $ESC_SHARED or ../shared)")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="intra-op thread counts")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help="keep adding rounds (up to 1000) until a batch/thread setting took this long")
    p.add_argument("--profile-runs", type=int, default=3, help="profiled ORT runs per model (0: none)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch FP32 row")
    p.add_argument("--quant-config", type=json.loads, default={}, metavar="JSON",
                   help="export phase: extra QuantConfig fields, e.g. '{\"quantize_attention\": true, "
                        "\"quantize_embeddings\": true}' (attention products and embedding tables in int8, "
                        "both outside the paper's op set)")
    p.add_argument("--load-note", default="", help="free text on the machine load, for the report")
    args = p.parse_args(argv)
    if args.measure and (args.export_only or args.out):
        p.error("--measure DIR measures an existing export; do not combine it with --out / --export-only")
    if not args.measure and not args.out:
        p.error("give --out DIR (export, then measure unless --export-only) or --measure DIR")
    if args.measure and args.model:
        p.error("--model adds a model to the export phase; with --measure use --models NAME")
    bad = [v for v in args.threads + args.batch_sizes if v < 1] + ([args.repeats] if args.repeats < 1 else [])
    if bad or args.warmup < 0 or args.profile_runs < 0:
        p.error("--threads, --batch-sizes and --repeats must be >= 1; --warmup, --profile-runs >= 0")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python benchmarks/latency.py " + shlex.join(argv)
    shared = Path(args.shared) if args.shared else None
    export_dir = args.measure or args.out
    if not args.measure:
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        from latency_export import export_all
        models = DEFAULT_MODELS if args.models is None else args.models
        export_all(models + args.model, args.out, shared, command, args.quant_config)
        if args.export_only:
            print(f"[export] wrote {Path(args.out) / 'manifest.json'}")
            return 0
    res = measure(export_dir, args.results, args.threads, args.batch_sizes, args.warmup, args.repeats,
                  args.models if args.measure else None, not args.no_torch, shared, args.profile_runs,
                  command, args.load_note, args.min_seconds)
    print(markdown(res))
    print(f"[measure] wrote {Path(args.results) / 'results.json'} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
