"""Drive a :class:`Task` through FP32 and quantized configurations and write results.

Used by the ``esc-quantize`` CLI and by ``benchmarks/``. Every run writes its
report JSON, plots and quantization state under its own folder; the results
table is written as JSON and markdown, atomically.
"""
import json
import os
import time

import torch

import esc_plugin as esc
from esc_plugin.core.io import write_bytes, write_json


def quantize_task(task, config, out_dir=None, progress=True):
    """Quantize ``task.model`` with ``config``; evaluate; write outputs to ``out_dir``."""
    t0 = time.perf_counter()
    qmodel = esc.quantize(task.model, config, task.forward_loop, task.objective, progress=progress)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        metrics = task.evaluate(qmodel)
    report = qmodel.esc_report
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        report.save_json(os.path.join(out_dir, "report.json"))
        report.plot(out_dir)
        esc.save(qmodel, os.path.join(out_dir, "quantized.pt"))
        write_json(os.path.join(out_dir, "metrics.json"), {"metrics": metrics, "seconds": seconds})
    return qmodel, metrics, seconds


def run_table(task, bits_list=(8, 4), methods=esc.METHODS, out_dir=None, progress=True, on_row=None,
              keep_going=False, **overrides):
    """FP32 + every (bits, method): rows of {config, metric, objective, seconds}.

    ``results.json`` / ``results.md`` in ``out_dir`` are rewritten after every
    row, so a run stopped part-way still leaves the rows it finished.
    ``on_row(rows)`` (optional) is called after each row, e.g. to archive
    ``out_dir``. With ``keep_going=True`` a (bits, method) that raises is
    reported, listed under ``"failed"`` in results.json and skipped instead of
    ending the table.
    """
    with torch.no_grad():
        fp32 = task.evaluate(task.model)
        fp32_objective = float(task.objective(task.model))
    rows = [{"config": "FP32", "bits": 32, "method": "-", "metrics": fp32, "objective": fp32_objective,
             "seconds": 0.0}]
    failed = []

    def row_done():
        if out_dir:
            write_results(task, rows, out_dir, failed)
        if on_row is not None:
            on_row(rows)

    row_done()
    for bits in bits_list:
        for method in methods:
            # "esc+best": ESC started from the best of its output-MSE init and the baselines' scales
            extra = {"init": "best"} if method == "esc+best" else {}
            cfg = esc.QuantConfig(bits=bits, method=method.split("+")[0], **extra, **overrides)
            sub = os.path.join(out_dir, f"w{bits}a{bits}_{method.replace('+', '_')}") if out_dir else None
            try:
                qmodel, metrics, seconds = quantize_task(task, cfg, sub, progress)
                with torch.no_grad():
                    objective = float(task.objective(qmodel))
            except Exception as e:  # noqa: BLE001 -- re-raised unless keep_going
                if not keep_going:
                    raise
                failed.append({"config": f"W{bits}A{bits}", "method": method, "error": f"{type(e).__name__}: {e}"})
                print(f"  {task.name} W{bits}A{bits} {method:10s} FAILED: {type(e).__name__}: {e}", flush=True)
                row_done()
                continue
            timings = dict(qmodel.esc_report.timings)
            if cfg.method == "esc":
                # ESC's cost relative to Γ plain fake-quantized objective evaluations
                timings["overhead_vs_budget_evals"] = seconds / (cfg.budget * timings["seconds_per_evaluation"])
            rows.append({"config": f"W{bits}A{bits}", "bits": bits, "method": method, "metrics": metrics,
                         "objective": objective, "seconds": seconds, "timings": timings})
            print(f"  {task.name} W{bits}A{bits} {method:10s} {task.metric}={metrics[task.metric]:.3f} "
                  f"objective={objective:.4g} ({seconds:.1f} s)", flush=True)
            row_done()
    return rows


def markdown_table(task, rows):
    arrow = "↑" if task.higher_is_better else "↓"
    extra = [k for k in rows[0]["metrics"] if k not in (task.metric, "n")]
    head = f"| config | calibrator | {task.metric} {arrow} | " + " | ".join(extra) + \
        (" | " if extra else "") + "calib. objective ↓ | time (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["metrics"]
        cells = [r["config"], r["method"], f"{m[task.metric]:.2f}"] + [f"{m[k]:.4g}" for k in extra] + \
            [f"{r['objective']:.4g}", f"{r['seconds']:.1f}"]
        ratio = r.get("timings", {}).get("overhead_vs_budget_evals")
        if ratio is not None:
            cells[-1] += f" ({ratio:.2f}× Γ evals)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(task, rows, out_dir, failed=None):
    os.makedirs(out_dir, exist_ok=True)
    results = {"task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
               "info": task.info, "rows": rows}
    if failed:
        results["failed"] = failed
    write_json(os.path.join(out_dir, "results.json"), results)
    md = f"### {task.name}\n\n{markdown_table(task, rows)}\n\n{json.dumps(task.info)}\n"
    write_bytes(os.path.join(out_dir, "results.md"), md.encode())
