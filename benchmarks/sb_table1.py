"""Paper Table 1 for a SpeechBrain recipe: FP32, then W8A8 / W4A4 × five calibrators.

Runs the recipe's own ``train.py`` (which trains once, then recovers its
checkpoint on every later run) with ``--quantize=<method>`` and collects the
``metrics.json`` the stage writes::

    python benchmarks/sb_table1.py recipes/SpeechCommands/KWS/ast/train.py \\
        recipes/SpeechCommands/KWS/ast/hparams/ast.yaml --out benchmarks/results/sb_ast \\
        -- --data_folder=../shared/data/speech_commands

Everything after ``--`` is passed to every recipe run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_plugin.core.io import write_bytes, write_json  # noqa: E402

METHODS = ("max", "percentile", "entropy", "mse", "esc")


def run_recipe(train_py, hparams, extra, log):
    cmd = [sys.executable, train_py, hparams] + extra
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"recipe failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t


def table(rows, keys):
    lines = ["| config | calibrator | " + " | ".join(keys) + " | calib. objective (FP32 → quantized) | time (s) |",
             "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        m = r["metrics"] or {}
        cells = [r["config"], r["method"]] + [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "-"
                                               for k in keys]
        obj = r.get("objective")
        cells.append(f"{obj['fp32']:.4g} → {obj['quantized']:.4g}" if obj else "-")
        cells.append(f"{r['seconds']:.0f}" if r.get("seconds") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_py")
    p.add_argument("hparams")
    p.add_argument("--out", required=True, help="folder for results.json / results.md (and the recipe's runs)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--run-dir", help="the recipe's --output_folder (default <out>/run); point it at an already "
                                     "trained recipe folder to quantize that checkpoint instead of training anew")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" goes to the recipe (split first: argparse.REMAINDER would swallow --out).
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    os.makedirs(args.out, exist_ok=True)
    run_dir = args.run_dir or os.path.join(args.out, "run")
    log = os.path.join(args.out, "recipe.log")
    base = extra + [f"--output_folder={run_dir}"]
    rows = []
    for bits in args.bits:
        for method in args.methods:
            seconds = run_recipe(args.train_py, args.hparams,
                                 base + [f"--quantize={method}", f"--quantization={{bits: {bits}}}"], log)
            folder = os.path.join(run_dir, "quantized", f"{method}_w{bits}a{bits}")
            with open(os.path.join(folder, "metrics.json")) as f:
                m = json.load(f)
            if not rows:
                rows.append({"config": "FP32", "method": "-", "metrics": m["fp32"], "objective": None,
                             "seconds": None})
            rows.append({"config": f"W{bits}A{bits}", "method": method, "metrics": m["quantized"],
                         "objective": m["calibration_objective"], "seconds": m.get("seconds"),
                         "recipe_seconds": seconds})
            md = write_results(args, extra, rows)  # after every row: a failed later run keeps the earlier ones
    print(md)


def write_results(args, extra, rows):
    keys = sorted({k for r in rows for k in (r["metrics"] or {})})
    write_json(os.path.join(args.out, "results.json"), {"recipe": args.train_py, "hparams": args.hparams,
                                                         "extra": extra, "rows": rows})
    cmd = "python benchmarks/sb_table1.py " + " ".join(["--out", args.out] +
                                                       (["--run-dir", args.run_dir] if args.run_dir else []) +
                                                       [args.train_py, args.hparams] +
                                                       (["--"] + extra if extra else []))
    md = f"### {os.path.basename(os.path.dirname(os.path.abspath(args.train_py)))}\n\n{table(rows, keys)}\n\n`{cmd}`\n"
    write_bytes(os.path.join(args.out, "results.md"), md.encode())
    return md


if __name__ == "__main__":
    main()
