"""Paper Table 1 on real models: FP32 vs W8A8 / W4A4 x {max, percentile, entropy, mse, esc}.

Calibration uses the task's calibration split (100 clips for honk, 9 for
Whisper, which is all the transcribed audio there is), the metric the
disjoint evaluation split. Writes results.json and results.md per task.

    python benchmarks/table1.py --task honk --out benchmarks/results/honk
    python benchmarks/table1.py --task whisper --out benchmarks/results/whisper
"""
import argparse
import sys
import time

import torch

import esc_plugin as esc
from esc_plugin.runner import markdown_table, run_table
from esc_plugin.tasks import get_task


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="honk | whisper | demo | package.module:function")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    p.add_argument("--methods", nargs="+", default=list(esc.METHODS) + ["esc+best"],
                   help="calibrators; 'esc+best' = ESC with QuantConfig(init='best')")
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra builder argument, e.g. --task-arg variant=res8")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = {}
    for kv in args.task_arg:
        key, value = kv.split("=", 1)
        kwargs[key] = int(value) if value.isdigit() else value
    t0 = time.time()
    task = get_task(args.task, **kwargs)
    print(f"built {task.name} in {time.time() - t0:.1f} s: {task.info}", flush=True)
    rows = run_table(task, args.bits, args.methods, args.out, progress=False, budget=args.budget, seed=args.seed)
    print(markdown_table(task, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
