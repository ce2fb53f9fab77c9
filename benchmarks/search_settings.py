"""Which ESC search settings generalise: search space, σ0, population, start point, objective.

Every combination of ``--spaces`` × ``--sigmas`` × ``--inits`` × ``--popsizes``
× ``--restarts`` (IPOP restarts within Γ) × objective (``task``: the task's calibration objective, ``distill``: the
label-free distillation objective with the selection guard) at each
``--bits``, within the same budget Γ; the test metric of each is what
decides a default. ``results.json`` / ``results.md`` (with commit and
command) are rewritten after every row.

    python benchmarks/search_settings.py --task honk --out benchmarks/results/search_settings_honk
"""
import argparse
import itertools
import os
import sys
import time

import torch

import esc_plugin as esc
from esc_plugin.core.io import write_bytes, write_json
from esc_plugin.tasks import get_task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import provenance_line  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="honk")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    p.add_argument("--spaces", nargs="+", default=["log", "range"])
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.1, 0.3])
    p.add_argument("--inits", nargs="+", default=["output_mse", "best"])
    p.add_argument("--popsizes", nargs="+", type=int, default=[0], help="0 = cma's default")
    p.add_argument("--restarts", nargs="+", type=int, default=[0], help="IPOP restarts within the budget")
    p.add_argument("--objectives", nargs="+", default=["task", "distill"], choices=["task", "distill"])
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    with torch.no_grad():
        fp32 = task.evaluate(task.model)[task.metric]
    rows = []
    grid = itertools.product(args.bits, args.objectives, args.spaces, args.sigmas, args.inits, args.popsizes,
                             args.restarts)
    for bits, objective, space, sigma, init, popsize, restarts in grid:
        cfg = esc.QuantConfig(bits=bits, budget=args.budget, seed=args.seed, search_space=space, sigma0=sigma,
                              init=init, popsize=popsize or None, restarts=restarts)
        t = time.perf_counter()
        q = esc.quantize(task.model, cfg, task.forward_loop, task.objective if objective == "task" else None,
                         progress=False)
        seconds = time.perf_counter() - t
        with torch.no_grad():
            metric = task.evaluate(q)[task.metric]
            calib = float(task.objective(q))
        rows.append({"bits": bits, "objective": objective, "space": space, "sigma0": sigma, "init": init,
                     "popsize": q.esc_report.history and max(1, sum(1 for h in q.esc_report.history
                                                                    if h["generation"] == 0)),
                     "restarts": restarts, "chosen": _chosen(q.esc_report.notes),
                     "metric": metric, "calib_objective": calib, "seconds": seconds,
                     "notes": q.esc_report.notes})
        r = rows[-1]
        print(f"W{bits}A{bits} {objective:7s} {space:5s} σ0={sigma:<4} init={init:10s} pop={r['popsize']:<3} "
              f"restarts={restarts} "
              f"{task.metric}={metric:.2f} calib={calib:.4g} ({seconds:.0f} s)", flush=True)
        result = {"task": task.name, "metric": task.metric, "fp32": fp32, "rows": rows, "provenance": provenance()}
        write_json(os.path.join(args.out, "results.json"), result)
        arrow = "↑" if task.higher_is_better else "↓"
        lines = [f"### {task.name}: ESC search settings (Γ = {args.budget}, FP32 {task.metric} {fp32:.2f})", "",
                 f"| config | objective | space | σ0 | start | λ | restarts | kept | {task.metric} {arrow} | "
                 "calib. objective | time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| W{x['bits']}A{x['bits']} | {x['objective']} | {x['space']} | {x['sigma0']} | {x['init']} | "
                  f"{x['popsize']} | {x['restarts']} | {x['chosen']} | {x['metric']:.2f} | "
                  f"{x['calib_objective']:.4g} | {x['seconds']:.1f} |" for x in rows]
        lines += ["", provenance_line(result["provenance"])]
        write_bytes(os.path.join(args.out, "results.md"), ("\n".join(lines) + "\n").encode())
    return 0


def _chosen(notes):
    """Which candidate the selection guard kept (mean / best_sample / init), from the report's note."""
    for note in notes:
        if note.startswith("selection guard: chose the "):
            return note.split("chose the ", 1)[1].split(" ", 1)[0]
    return "mean"


if __name__ == "__main__":
    sys.exit(main())
