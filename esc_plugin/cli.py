"""``esc-quantize``: quantize a task with ESC or a baseline calibrator.

Examples
--------
    esc-quantize demo --out runs/demo                      # built-in default, no data needed
    esc-quantize run --task honk --bits 4 --method esc --out runs/honk-w4a4
    esc-quantize run --task mypkg.tasks:build --bits 8 --out runs/mine
"""
import argparse
import os
import sys

from esc_plugin.core.config import METHODS


def _common(p):
    p.add_argument("--out", default=None, help="output folder (report.json, plots, quantized.pt, results)")
    p.add_argument("--budget", type=int, default=100, help="ESC: CMA-ES objective evaluations Γ (default 100)")
    p.add_argument("--sigma0", type=float, default=0.1, help="ESC: initial step size (default 0.1)")
    p.add_argument("--popsize", type=int, default=None, help="ESC: CMA-ES population (default 4+3 ln N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser():
    parser = argparse.ArgumentParser(prog="esc-quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small keyword model on synthesised audio, quantize it "
                                       "with every calibrator at W8A8 and W4A4, print the table")
    _common(demo)
    demo.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    demo.add_argument("--bits", nargs="+", type=int, default=[8, 4], choices=[4, 8])

    run = sub.add_parser("run", help="quantize one task with one configuration")
    _common(run)
    run.add_argument("--task", required=True, help="demo | honk | whisper | package.module:function")
    run.add_argument("--method", default="esc", choices=METHODS)
    run.add_argument("--bits", type=int, default=8, choices=[4, 8])
    run.add_argument("--weight-bits", type=int, default=None, choices=[4, 8])
    run.add_argument("--act-bits", type=int, default=None, choices=[4, 8])
    run.add_argument("--n-samples", type=int, default=100, help="calibration samples (default 100)")
    run.add_argument("--shared", default=None, help="folder with real data/models (default $ESC_SHARED or ../shared)")
    run.add_argument("--checkpoint", default=None, help="ESC: CMA-ES state file; rerun to resume")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    import esc_plugin as esc
    from esc_plugin.runner import markdown_table, quantize_task, run_table
    from esc_plugin.tasks import get_task

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    search = dict(budget=args.budget, sigma0=args.sigma0, popsize=args.popsize, seed=args.seed)
    progress = not args.no_progress
    if args.command == "demo":
        print("Building the demo task (synthesised keywords, small Conv+attention model)...", flush=True)
        task = get_task("demo", seed=args.seed)
        out = args.out or os.path.join("runs", "demo")
        rows = run_table(task, args.bits, args.methods, out, progress=progress, **search)
        print("\n" + markdown_table(task, rows))
        print(f"\nReports, plots and quantized states under {out}/")
        return 0

    kwargs = {"n_calib": args.n_samples} if args.task in ("demo", "honk") else {}
    if args.shared and args.task in ("honk", "whisper"):
        kwargs["shared_root"] = args.shared
    task = get_task(args.task, **kwargs)
    cfg = esc.QuantConfig(bits=args.bits, method=args.method, weight_bits=args.weight_bits,
                          act_bits=args.act_bits, n_samples=args.n_samples, checkpoint=args.checkpoint, **search)
    with torch.no_grad():
        fp32 = task.evaluate(task.model)
    qmodel, metrics, seconds = quantize_task(task, cfg, args.out, progress)
    print(qmodel.esc_report.summary())
    print(f"{task.name}: FP32 {task.metric}={fp32[task.metric]:.3f}  "
          f"W{cfg.weight_bits}A{cfg.act_bits} {cfg.method} {task.metric}={metrics[task.metric]:.3f}  ({seconds:.1f} s)")
    if args.out:
        print(f"outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
