"""Drive a :class:`Task` through FP32 and quantized configurations and write results.

Used by the ``esc-quantize`` CLI and by ``benchmarks/``. Every run writes its
report JSON, plots and quantization state under its own folder; the results
table is written as JSON and markdown, atomically, with the commit and the
command that produced it (:func:`provenance`).

Configurations are named by preset (:func:`esc_plugin.core.presets.preset_names`):
a calibrator name (``max``, ``esc``...) or a named variant (``esc_paper``).
Rows and run folders carry :func:`~esc_plugin.core.presets.label_of` the config,
so a variant has one name in tables, folders and command lines.
"""
import json
import os
import subprocess
import sys
import time

import torch

import esc_plugin as esc
from esc_plugin.core.io import write_bytes, write_json
from esc_plugin.core.presets import config_for, label_of
from esc_plugin.core.registry import calibrator_names

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RESULTS_DIR = "benchmarks/results"


def provenance(command=None):
    """``{"commit", "dirty", "command"}`` for a results file.

    ``commit`` is ``git rev-parse HEAD`` of the checkout holding esc_plugin
    (None outside a git checkout), ``dirty`` whether tracked files differ from
    it (None when unknown), ``command`` the argument list (default
    ``sys.argv``). Files under ``benchmarks/results/`` do not count: they are
    what the benchmarks write, so a table filled by several commands in turn
    stays clean while the code under it is.
    """
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 f":(exclude){RESULTS_DIR}") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status),
            "command": list(sys.argv if command is None else command)}


def quantize_task(task, config, out_dir=None, progress=True, command=None, prov=None, task_spec=None):
    """Quantize ``task.model`` with ``config``; evaluate; write outputs to ``out_dir``
    (``metrics.json`` records ``prov``, default :func:`provenance` of ``command``).

    ``task_spec=(name, builder_kwargs)`` also writes ``task.json``, which lets
    ``esc-quantize export`` rebuild the FP32 model of the run."""
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
        write_json(os.path.join(out_dir, "metrics.json"),
                   {"metrics": metrics, "seconds": seconds, "config": label_of(config),
                    "provenance": provenance(command) if prov is None else prov})
        if task_spec is not None:
            from esc_plugin.export.command import write_task_file
            write_task_file(out_dir, *task_spec)
    return qmodel, metrics, seconds


def table_configs(bits_list, methods, **overrides):
    """``[(bits, QuantConfig)]`` for every bit width x preset name, all validated
    (a bad option fails here, before any model is run)."""
    return [(bits, config_for(method, bits=bits, **overrides)) for bits in bits_list for method in methods]


def evaluation_overhead(seconds, timings):
    """Wall-clock of a run relative to the objective evaluations it really made:
    ``seconds / (n_evaluations * seconds_per_evaluation)`` (None without evaluations)."""
    n = timings.get("n_evaluations") or 0
    per = timings.get("seconds_per_evaluation") or 0.0
    return seconds / (n * per) if n > 0 and per > 0 else None


def run_table(task, bits_list=(8, 4), methods=None, out_dir=None, progress=True, on_row=None,
              keep_going=False, command=None, task_spec=None, peers=None, **overrides):
    """FP32 + every (bits, preset): rows of {config, method, metrics, objective, seconds}.

    ``methods`` are preset names (default: every registered calibrator).
    Every configuration is built before the first model run, so a bad option
    fails at once. ``results.json`` / ``results.md`` in ``out_dir`` are
    rewritten after every row, so a run stopped part-way still leaves the rows
    it finished. ``on_row(rows)`` (optional) is called after each row, e.g. to
    archive ``out_dir``. With ``keep_going=True`` a configuration that raises
    is reported, listed under ``"failed"`` in results.json and skipped instead
    of ending the table. ``command`` is recorded in results.json (default
    ``sys.argv``). ``task_spec`` (see :func:`quantize_task`) goes into each run folder.
    ``peers`` (optional) maps a row name to another quantizer, an object with
    ``quantize(model, forward_loop, objective) -> model``, ``bits`` (the widths it runs
    at) and ``note``: its rows follow the presets' at each of those widths,
    on the same calibration loop and evaluation; a peer that fails on the
    model is listed under ``"failed"``, whatever ``keep_going`` says.
    """
    methods = list(calibrator_names() if methods is None else methods)
    configs = table_configs(bits_list, methods, **overrides)
    with torch.no_grad():
        fp32 = task.evaluate(task.model)
        fp32_objective = float(task.objective(task.model))
    rows = [{"config": "FP32", "bits": 32, "method": "-", "metrics": fp32, "objective": fp32_objective,
             "seconds": 0.0}]
    failed = []
    prov = provenance(command)  # once: the commit the run started from

    def row_done():
        if out_dir:
            write_results(task, rows, out_dir, failed, prov=prov)
        if on_row is not None:
            on_row(rows)

    def preset_row(bits, cfg):
        label = label_of(cfg)
        sub = os.path.join(out_dir, f"w{bits}a{bits}_{label}") if out_dir else None
        qmodel, metrics, seconds = quantize_task(task, cfg, sub, progress, prov=prov, task_spec=task_spec)
        timings = dict(qmodel.esc_report.timings)
        # the run's wall-clock relative to the objective evaluations it really made (ESC's
        # search, percentile's candidates...); absent for calibrators that never evaluate
        ratio = evaluation_overhead(seconds, timings)
        if ratio is not None:
            timings["overhead_vs_evaluations"] = ratio
        return qmodel, {"method": label, "metrics": metrics, "seconds": seconds, "timings": timings}

    def peer_row(name):
        t0 = time.perf_counter()
        qmodel = peers[name].quantize(task.model, task.forward_loop, task.objective)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            metrics = task.evaluate(qmodel)
        return qmodel, {"method": name, "metrics": metrics, "seconds": seconds, "note": peers[name].note}

    # (bits, row name, run, is a peer)
    jobs = [(bits, label_of(cfg), lambda b=bits, c=cfg: preset_row(b, c), False) for bits, cfg in configs]
    for name, peer in (peers or {}).items():
        jobs += [(bits, name, lambda n=name: peer_row(n), True) for bits in bits_list if bits in peer.bits]
    order = {b: i for i, b in enumerate(bits_list)}
    jobs.sort(key=lambda job: order[job[0]])  # stable: at each width the presets, then the peers
    row_done()
    for bits, label, run, is_peer in jobs:
        try:
            qmodel, row = run()
            with torch.no_grad():
                objective = float(task.objective(qmodel))
        except Exception as e:  # noqa: BLE001 -- re-raised unless keep_going or a peer's
            if not (keep_going or is_peer):  # another tool that cannot take this model: a failed row
                raise
            failed.append({"config": f"W{bits}A{bits}", "method": label, "error": f"{type(e).__name__}: {e}"})
            print(f"  {task.name} W{bits}A{bits} {label:12s} FAILED: {type(e).__name__}: {e}", flush=True)
            row_done()
            continue
        rows.append({"config": f"W{bits}A{bits}", "bits": bits, **row, "objective": objective})
        print(f"  {task.name} W{bits}A{bits} {label:12s} {task.metric}={row['metrics'][task.metric]:.3f} "
              f"objective={objective:.4g} ({row['seconds']:.1f} s)", flush=True)
        row_done()
    return rows


def _time_cell(row):
    cell = f"{row['seconds']:.1f}"
    timings = row.get("timings", {})
    ratio = timings.get("overhead_vs_evaluations")
    if ratio is not None:
        return cell + f" ({ratio:.2f}× its {timings.get('n_evaluations')} evals)"
    old = timings.get("overhead_vs_budget_evals")  # results.json written before the real count was used
    if old is not None:
        return cell + f" ({old:.2f}× Γ evals)"
    return cell


def markdown_table(task, rows):
    """Rows as markdown; the time cell of a run that evaluated the objective adds
    its wall-clock relative to those evaluations (``r× its k evals``: r = seconds
    / (k x seconds per evaluation), k the count the report gives)."""
    arrow = "↑" if task.higher_is_better else "↓"
    extra = [k for k in rows[0]["metrics"] if k not in (task.metric, "n")]
    head = f"| config | calibrator | {task.metric} {arrow} | " + " | ".join(extra) + \
        (" | " if extra else "") + "calib. objective ↓ | time (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["metrics"]
        cells = [r["config"], r["method"], f"{m[task.metric]:.2f}"] + [f"{m[k]:.4g}" for k in extra] + \
            [f"{r['objective']:.4g}", _time_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(task, rows, out_dir, failed=None, command=None, prov=None):
    """``results.json`` (task, rows, failures, provenance) and ``results.md`` in ``out_dir``.

    ``prov`` is a :func:`provenance` dict (default: taken now, with ``command``)."""
    os.makedirs(out_dir, exist_ok=True)
    prov = provenance(command) if prov is None else prov
    results = {"task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
               "info": task.info, "rows": rows, "provenance": prov}
    if failed:
        results["failed"] = failed
    write_json(os.path.join(out_dir, "results.json"), results)
    dirty = " (uncommitted changes)" if prov["dirty"] else ""
    notes = {r["method"]: r["note"] for r in rows if r.get("note")}  # peer rows: what they ran
    notes = "".join(f"* {name}: {note}\n" for name, note in notes.items()) + ("\n" if notes else "")
    md = (f"### {task.name}\n\n{markdown_table(task, rows)}\n\n{notes}{json.dumps(task.info)}\n\n"
          f"Commit {prov['commit']}{dirty}; command: `{' '.join(prov['command'])}`\n")
    write_bytes(os.path.join(out_dir, "results.md"), md.encode())
