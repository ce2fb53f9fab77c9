"""Scaling the ESC search (issue #12): evaluations/s and ESC wall-clock, serial vs Ray vs batching.

Rows per model: the serial executor (torch's own threads, as a user runs it;
then one thread; then both again in a fresh process that keeps freed memory,
``esc_plugin.keep_freed_memory()``, which every Ray actor does in its own process),
Ray with 1 and 2 workers (a local runtime of ``--ray-cpus`` CPUs, actors
started fresh for each row, so their start-up is in the wall-clock), and
population batching ``batch_candidates`` = 1 / 4 / 16 on the serial
executor. Every row's final scales are compared bit for bit with the serial
row's. On a machine with a GPU (``--device cuda``) the same rows run with the
model on the GPU and the Ray actors take ``num_gpus_per_worker=1``.

Models: ``honk`` (res8-narrow, the task's real objective: calibration error +
cross-entropy tie-breaker, 100 clips), ``conformer_ctc`` (the in-project
SpeechBrain Conformer-CTC, label-free distillation objective on its
calibration features; ``$ESC_CONFORMER_CTC_RUN`` = the recipe's output folder)
and ``whisper`` (Whisper tiny.en task, teacher-forced cross-entropy objective;
slow on CPU). ``--whisper-eval`` times one Whisper tiny.en objective
evaluation (the denominator of the Ray-overhead target) without a search.

Evaluations/s are those of the CMA-ES generations (``search_generations``), the part an executor
spreads; the search column adds the actors' start and the final mean's and the selection guard's
evaluations, which run in the driver, and the wall-clock column is the whole ``esc.quantize``.

Outputs ``results.json`` and ``results.md`` in ``--out`` with commit, dirty
flag and command, plus a projection for Whisper large-v3 from the measured
costs: the Whisper tiny.en evaluation of ``--whisper-eval``, and any cost given
with ``--projection-eval-seconds`` (e.g. one measured on a GPU).

    python benchmarks/scaling.py --out benchmarks/results/scaling --models honk conformer_ctc --whisper-eval
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import esc_plugin as esc  # noqa: E402
from esc_plugin.core.batching import BatchingError  # noqa: E402
from esc_plugin.core.io import write_bytes  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402


def build(name, device, shared):
    """``(model, forward_loop, objective or None, description)``."""
    if name == "honk":
        from esc_plugin.tasks import get_task

        task = get_task("honk", shared_root=shared, eval_limit=1)
        return task.model, task.forward_loop, task.objective, "honk res8-narrow, 100 calibration clips, task objective"
    if name == "conformer_ctc":
        from latency_models import build_conformer_ctc

        bench = build_conformer_ctc(shared, n_calib=100)
        feats = [x.to(device) for x in bench.calibration]

        def loop(m):
            for x in feats:
                m(x)

        return bench.model.to(device), loop, None, "SpeechBrain Conformer-CTC, 100 calibration clips, distillation"
    if name == "whisper":
        from esc_plugin.tasks import get_task

        task = get_task("whisper", shared_root=shared, objective="ce")
        return task.model, task.forward_loop, task.objective, "Whisper tiny.en, teacher-forced CE objective"
    raise SystemExit(f"unknown model {name!r}: use honk, conformer_ctc or whisper")


def run_row(model, loop, objective, options, budget):
    options = dict(options)
    threads, before = options.pop("threads", None), torch.get_num_threads()
    config = esc.QuantConfig(bits=8, budget=budget, **options)
    if threads:
        torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        q = esc.quantize(model, config, loop, objective, progress=False)
        wall = time.perf_counter() - t
    finally:
        torch.set_num_threads(before)
    tm = q.esc_report.timings
    n = tm["n_search_evaluations"]
    # the generations alone: the final mean's and the selection guard's evaluations run in the driver after them
    loop_s = tm["search_generations"]
    return {"options": {**options, **({"threads": threads} if threads else {})}, "wall_s": wall, "search_s": tm["search"], "executor_start_s": tm["executor_start"],
            "n_search_evaluations": n, "generations_s": loop_s, "evaluations_per_s": n / loop_s,
            "evaluation_s_sum": tm["search_evaluation_seconds"],
            "overhead_ms_per_evaluation": 1e3 * (loop_s - tm["search_evaluation_seconds"]) / n
            if options.get("workers", 1) == 1 else None,
            "scales": [layer.final for layer in q.esc_report.layers],
            "history": [h["loss"] for h in q.esc_report.history]}


FRESH_PROCESS = "fresh process keeping freed memory"


def run_row_in_fresh_process(name, args, options):
    """The row in a new interpreter that calls ``esc_plugin.keep_freed_memory()`` first, as each Ray actor
    does (the settings cannot be undone, so never in this process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    options = {k: v for k, v in options.items() if k != FRESH_PROCESS}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        row = pool.submit(_fresh_row, name, args.device, args.shared, options, args.budget).result()
    row["options"][FRESH_PROCESS] = True
    return row


def _fresh_row(name, device, shared, options, budget):
    from esc_plugin.core.allocator import keep_freed_memory

    if not keep_freed_memory():
        raise SystemExit("keep_freed_memory() does not apply on this machine (not glibc, or MALLOC_* tuning set)")
    torch.set_num_threads(options.get("threads") or torch.get_num_threads())  # the row's threads, from the start
    model, loop, objective, _ = build(name, device, shared)
    return run_row(model, loop, objective, options, budget)


def bench_model(name, args, ray):
    model, loop, objective, description = build(name, args.device, args.shared)
    gpu = {"num_gpus_per_worker": 1} if args.device == "cuda" else {}
    # torch's own threads use both cores of a small machine well; one thread is what each Ray actor gets
    rows = [("serial", {}), ("serial, 1 torch thread", {"threads": 1}),
            # what each Ray actor does in its own process (see esc_plugin/core/allocator.py), done here in a
            # fresh one, so the comparison with the actors is like for like and this process stays as a user's
            ("serial, freed memory kept", {FRESH_PROCESS: True}),
            ("serial, 1 torch thread, freed memory kept", {"threads": 1, FRESH_PROCESS: True})]
    rows += [(f"ray {w} worker{'s' if w > 1 else ''}", {"executor": "ray", "workers": w, **gpu})
             for w in args.workers]
    rows += [(f"batch k={k}", {"batch_candidates": k}) for k in args.batch if k > 1]
    rows += [(f"ray {w} workers, batch k={k}", {"executor": "ray", "workers": w, "batch_candidates": k, **gpu})
             for w in args.workers if w > 1 for k in args.ray_batch if k > 1]
    out = []
    for label, options in rows:
        if options.get("executor") == "ray":
            from esc_plugin.core.executors.ray_actors import release_workers

            release_workers()  # fresh actors: their start-up is part of the wall-clock
        print(f"[{name}] {label} ...", flush=True)
        try:
            row = (run_row_in_fresh_process(name, args, options) if options.get(FRESH_PROCESS)
                   else run_row(model, loop, objective, options, args.budget))
        except BatchingError as exc:  # a model that cannot be batched: recorded, the other rows still run
            out.append({"row": label, "options": options, "error": str(exc)})
            print(f"[{name}] {label}: {exc}", flush=True)
            continue
        row["row"] = label
        out.append(row)
        print(f"[{name}] {label}: {row['evaluations_per_s']:.2f} evals/s, search {row['search_s']:.1f} s, "
              f"wall {row['wall_s']:.1f} s", flush=True)
    base = out[0]
    for row in out:
        if "error" in row:
            continue
        row["speedup_vs_serial"] = row["evaluations_per_s"] / base["evaluations_per_s"]
        row["same_scales_as_serial"] = row["scales"] == base["scales"]
        row["same_history_as_serial"] = row["history"] == base["history"]
    return {"model": name, "description": description, "rows": out}


def whisper_evaluation_seconds(shared, repeats):
    from esc_plugin.tasks import get_task

    task = get_task("whisper", shared_root=shared)
    q = esc.quantize(task.model, esc.QuantConfig(bits=8, method="max"), task.forward_loop, progress=False)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        task.objective(q)
        times.append(time.perf_counter() - t)
    return {"objective": task.info.get("objective"), "n_calib": task.info.get("n_calib"),
            "seconds": times, "median_s": float(np.median(times)),
            "sites": len(q.esc_report.layers)}


# Whisper parameter counts (the model cards) and layer counts (encoder + decoder): large-v3's compute per
# token is taken as tiny.en's times the parameter ratio, its quantized sites as tiny.en's times the layer ratio.
WHISPER_TINY_EN = {"params_m": 39, "layers": 4 + 4}
WHISPER_LARGE_V3 = {"params_m": 1550, "layers": 32 + 32}


def projection(eval_seconds, popsize, budget=100, gpus=(1, 8)):
    """Wall-clock of ESC's search when each generation's λ candidates are spread over g devices."""
    full, last = divmod(budget, popsize)
    out = {}
    for g in gpus:
        rounds = full * math.ceil(popsize / g) + (math.ceil(last / g) if last else 0)
        out[g] = {"rounds": rounds, "hours": rounds * eval_seconds / 3600}
    return out


def large_v3_projection(tiny_eval_seconds, tiny_sites, tiny_clips, source, budget=100, clips=100):
    """ESC on Whisper large-v3 (Γ = ``budget``, n = ``clips``) on 1 vs 8 GPUs, from a measured tiny.en
    evaluation on ``tiny_clips`` clips (its cost taken as proportional to the number of clips)."""
    sites = tiny_sites * WHISPER_LARGE_V3["layers"] // WHISPER_TINY_EN["layers"]
    popsize = 4 + int(3 * math.log(sites))  # cma's default λ, as ScaleSearch uses
    eval_s = tiny_eval_seconds * clips / tiny_clips * WHISPER_LARGE_V3["params_m"] / WHISPER_TINY_EN["params_m"]
    return {"source": source, "tiny_eval_s": tiny_eval_seconds, "tiny_sites": tiny_sites, "tiny_clips": tiny_clips,
            "clips": clips, "sites": sites,
            "popsize": popsize, "eval_s": eval_s, "budget": budget,
            "gpus": {str(g): v for g, v in projection(eval_s, popsize, budget).items()}}


def markdown(result):
    prov = result["provenance"]
    lines = ["# ESC search scaling (issue #12)", "",
             f"commit `{prov['commit']}` (dirty: {prov['dirty']}), command `{' '.join(prov['command'])}`", "",
             f"machine: {result['machine']}", ""]
    for m in result["models"]:
        lines += [f"## {m['model']}: {m['description']}", "",
                  "| row | evals/s | × serial | generations (s) | search (s) | of which actor start (s) | "
                  "ESC wall-clock (s) | overhead / eval (ms) | same scales & history as serial |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {r['row']} | not run: {r['error']} | | | | | | | |")
                continue
            ovh = "–" if r["overhead_ms_per_evaluation"] is None else f"{r['overhead_ms_per_evaluation']:.1f}"
            same = "yes" if r["same_scales_as_serial"] and r["same_history_as_serial"] else \
                ("scales yes, history no" if r["same_scales_as_serial"] else "no")
            start = r.get("executor_start_s")
            gens = r.get("generations_s")
            lines.append(f"| {r['row']} | {r['evaluations_per_s']:.2f} | {r['speedup_vs_serial']:.2f} | "
                         f"{'–' if gens is None else f'{gens:.1f}'} | "
                         f"{r['search_s']:.1f} | {'–' if start is None else f'{start:.1f}'} | {r['wall_s']:.1f} | "
                         f"{ovh} | {same} |")
        lines.append("")
    w = result.get("whisper_evaluation")
    if w:
        lines += ["## Whisper tiny.en objective evaluation", "",
                  f"objective `{w['objective']}` on {w['n_calib']} clips, {result['device']}: median "
                  f"{w['median_s']:.2f} s over {len(w['seconds'])} calls.", ""]
        for m in result["models"]:
            for r in m["rows"]:
                if r.get("options", {}).get("executor") == "ray" and r.get("overhead_ms_per_evaluation") is not None:
                    ms = r["overhead_ms_per_evaluation"]
                    lines += [f"* Ray overhead per evaluation ({m['model']}, {r['row']}): {ms:.1f} ms = "
                              f"{100 * ms / 1e3 / w['median_s']:.2f} % of a Whisper tiny.en evaluation."]
        lines.append("")
    for p in result.get("projections", []):
        one, eight = p["gpus"]["1"], p["gpus"]["8"]
        lines += [f"## Projection: ESC on Whisper large-v3 (Γ = {p['budget']}, n = 100), from {p['source']}", "",
                  f"A tiny.en evaluation took {p['tiny_eval_s']:.2f} s on {p['tiny_clips']} clips over "
                  f"{p['tiny_sites']} activation sites. Large-v3 is taken as {p['clips']} / {p['tiny_clips']} "
                  f"clips × {WHISPER_LARGE_V3['params_m']} M / {WHISPER_TINY_EN['params_m']} M "
                  f"parameters = compute per evaluation ({p['eval_s']:.0f} s each) and "
                  f"{WHISPER_LARGE_V3['layers']} / {WHISPER_TINY_EN['layers']} layers = sites ({p['sites']}, "
                  f"so λ = {p['popsize']}); a generation's λ candidates are spread over the GPUs "
                  "(Ray, one actor per GPU), generations run one after another.", "",
                  "| GPUs | rounds of evaluations | search hours |", "|---|---|---|",
                  f"| 1 | {one['rounds']} | {one['hours']:.2f} |", f"| 8 | {eight['rounds']} | {eight['hours']:.2f} |",
                  ""]
    for note in result.get("notes", []):
        lines.append(f"* {note}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["honk", "conformer_ctc"])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--ray-batch", type=int, nargs="*", default=[])
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shared", default=None)
    ap.add_argument("--whisper-eval", action="store_true")
    ap.add_argument("--whisper-repeats", type=int, default=2)
    ap.add_argument("--projection-eval-seconds", type=float, nargs=3, metavar=("SECONDS", "SITES", "CLIPS"),
                    default=None, help="project large-v3 also from this tiny.en evaluation cost (e.g. one measured "
                                       "on a GPU), its number of activation sites and of clips")
    ap.add_argument("--projection-source", default="--projection-eval-seconds",
                    help="where the --projection-eval-seconds cost was measured (printed with the projection)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import ray

    ray.init(num_cpus=args.ray_cpus, num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0,
             include_dashboard=False, log_to_driver=False)
    result = {"provenance": provenance(), "device": args.device,
              "machine": f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.2f} at the start), torch threads "
                         f"{torch.get_num_threads()}, Ray runtime of {args.ray_cpus} CPUs"
                         + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ", no GPU"),
              "models": [], "notes": ["Every Ray actor keeps freed memory in its process "
                                      "(esc_plugin.keep_freed_memory()); this process does not, so the "
                                      "serial rows are as a user's script runs them, and the row "
                                      "'freed memory kept' is the serial search with the actors' settings."]}
    try:
        for name in args.models:
            result["models"].append(bench_model(name, args, ray))
            _write(out, result)
        if args.whisper_eval:
            w = result["whisper_evaluation"] = whisper_evaluation_seconds(args.shared, args.whisper_repeats)
            result.setdefault("projections", []).append(
                large_v3_projection(w["median_s"], w["sites"], w["n_calib"],
                                    f"this run's tiny.en evaluation ({args.device})", args.budget))
            _write(out, result)
        if args.projection_eval_seconds:
            seconds, sites, clips = args.projection_eval_seconds
            result.setdefault("projections", []).append(
                large_v3_projection(seconds, int(sites), int(clips), args.projection_source, args.budget))
    finally:
        ray.shutdown()
    _write(out, result)


def _write(out, result):
    write_bytes(out / "results.json", json.dumps(result, indent=1, default=str).encode())
    write_bytes(out / "results.md", markdown(result).encode())


if __name__ == "__main__":
    main()
