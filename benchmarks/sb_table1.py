"""Paper Table 1 for a SpeechBrain recipe: FP32, then W8A8 / W4A4 × every calibrator.

Runs the recipe's own ``train.py`` (which trains once, then recovers its
checkpoint on every later run) with ``--quantize=<method>`` and collects the
``metrics.json`` the stage writes::

    python benchmarks/sb_table1.py recipes/SpeechCommands/KWS/ast/train.py \\
        recipes/SpeechCommands/KWS/ast/hparams/ast.yaml --out benchmarks/results/sb_ast \\
        -- --data_folder=../shared/data/speech_commands

Everything after ``--`` is passed to every recipe run. ``--methods`` takes
the preset names (:func:`esc_plugin.core.presets.preset_names`: every
registered calibrator and named variants such as ``esc_paper``, ESC with the
paper's search settings), plus SpeechBrain-stage variants: ``esc_loss``, ESC
with the recipe's loss as the objective instead of its metric (stage option
``metric: loss``; smooth where an error rate over 100 samples is coarse),
``esc_distill``: ESC on the label-free objective (``objective: distill``),
and ``esc_paper_loss`` / ``esc_initbest_loss``: those presets on the loss.
Rows named ``esc`` before the ESC defaults changed are stored as
``esc_paper`` (see ``RENAMED``), so a table never mixes the two.
Peer quantizers run as the recipe's stage too: ``nncf`` (Intel NNCF's
``nncf.quantize``, INT8 default preset; W8A8 rows only; ``pip install -e
".[peers]"``).
Rows already in ``<out>/results.json`` for the same recipe are kept unless
re-run, so rows can be added by later runs; each row records the commit it
was produced at (``provenance``) and the FP32 result it was measured
against: when the FP32 result changes (the recipe was retrained), the rows
of the earlier model are dropped. A recipe run that fails is a ``failed``
row naming the log, and the table goes on.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_plugin.core.io import write_bytes, write_json  # noqa: E402
from esc_plugin.core.presets import preset_names, preset_options  # noqa: E402
from esc_plugin.core.registry import calibrator_names  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402
from esc_plugin.speechbrain.settings import PEERS  # noqa: E402

# SpeechBrain-stage variants: stage options (metric: loss) that are not QuantConfig fields,
# so not presets: row name -> (base preset, extra stage options)
STAGE_VARIANTS = {"esc_loss": ("esc", {"metric": "loss"}),
                  "esc_distill": ("esc", {"objective": "distill"}),
                  # the recipe's metric with the label-free distance to FP32 added as a tie-breaker
                  "esc_tiebreak": ("esc", {"distill_weight": 1.0}),
                  "esc_paper_loss": ("esc_paper", {"metric": "loss"}),
                  "esc_initbest_loss": ("esc_initbest", {"metric": "loss"})}


# row names of results written before QuantConfig's ESC defaults became the former esc_recommended
# preset: old name -> today's name for the same settings. Rows of an older results.json (without
# "names": NAMES) are renamed on reading, so a rerun never mixes the two meanings of "esc".
RENAMED = {"esc": "esc_paper", "esc_loss": "esc_paper_loss", "esc_recommended": "esc",
           "esc_recommended_distill": "esc_distill"}
NAMES = 2


def rename_rows(rows):
    """Rows of an earlier results.json under today's names (each renamed row keeps its old one)."""
    out = []
    for r in rows:
        if r.get("names") != NAMES and r["method"] in RENAMED:
            r = {**r, "method": RENAMED[r["method"]], "renamed_from": r["method"]}
        out.append({**r, "names": NAMES})
    return out


def method_names():
    """Every row name this script runs: the presets, the stage variants, then the peers."""
    return tuple(preset_names()) + tuple(STAGE_VARIANTS) + PEERS


def recipe_options(name):
    """``(quantize:, quantization: options)`` of a row name for the recipe's command line."""
    if name in PEERS:
        return name, {}
    base, stage = STAGE_VARIANTS.get(name, (name, {}))
    options = preset_options(base)
    return options.pop("method"), {**options, **stage}


# characters that end or change a plain scalar in a YAML flow mapping
YAML_SPECIAL = "[]{},:#&*!|>'\"%@`"


def quantization_block(options):
    """The ``--quantization={...}`` value of ``options``, lists (e.g. ``ptq``) in YAML flow style.

    Strings YAML would read otherwise (a path with brackets, a colon, a
    comma) are written quoted.

    >>> quantization_block({"bits": 4, "ptq": ("adaround", "bias_correction")})
    '{bits: 4, ptq: [adaround, bias_correction]}'
    >>> quantization_block({"output_folder": "/tmp/q/esc[a=b]", "method": "esc"})
    '{output_folder: "/tmp/q/esc[a=b]", method: esc}'
    """
    def scalar(v):
        text = str(v)
        plain = isinstance(v, (bool, int, float)) or (text and not set(text) & set(YAML_SPECIAL)
                                                       and text == text.strip())
        return text if plain else json.dumps(text)

    def value(v):
        return "[" + ", ".join(scalar(x) for x in v) + "]" if isinstance(v, (list, tuple)) else scalar(v)

    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in options.items()) + "}"


def run_recipe(train_py, hparams, extra, log):
    cmd = [sys.executable, train_py, hparams] + extra
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        return None, f"recipe failed (exit {proc.returncode}); see {os.path.basename(log)}"
    return time.perf_counter() - t, None


def table(rows, keys):
    lines = ["| config | calibrator | " + " | ".join(keys) + " | calib. objective (FP32 → quantized) | time (s) |",
             "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        m = r["metrics"] or {}
        if r.get("failed"):
            lines.append("| " + " | ".join([r["config"], r["method"], f"failed: {r['failed']}"] +
                                           ["-"] * (len(keys) + 1)) + " |")
            continue
        cells = [r["config"], r["method"]] + [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "-"
                                               for k in keys]
        obj = r.get("objective")
        cells.append(f"{obj['fp32']:.4g} → {obj['quantized']:.4g}" if obj else "-")
        cells.append(f"{r['seconds']:.0f}" if r.get("seconds") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv_given = argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_py")
    p.add_argument("hparams")
    p.add_argument("--out", required=True, help="folder for results.json / results.md (and the recipe's runs)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--methods", nargs="+", default=list(calibrator_names()), choices=method_names(),
                   help="presets / stage variants (default: every calibrator)")
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
    rows, commands = _previous_rows(args)
    commands = [c for c in commands if c != _command(args, extra)] + [_command(args, extra)]
    prov = provenance(sys.argv if argv_given is None else ["benchmarks/sb_table1.py", *argv_given])
    for bits in args.bits:
        for method in args.methods:
            if method in PEERS and bits != 8:
                continue  # peers run their INT8 default preset
            quantize, options = recipe_options(method)
            folder = os.path.join(run_dir, "quantized", f"{method}_w{bits}a{bits}")  # the row's own folder
            block = quantization_block({"bits": bits, **options, "output_folder": folder})
            seconds, failure = run_recipe(args.train_py, args.hparams,
                                          base + [f"--quantize={quantize}", f"--quantization={block}"], log)
            rows = [r for r in rows if (r["config"], r["method"]) != (f"W{bits}A{bits}", method)]
            if failure:  # a row that cannot run is a row that says so, not the end of the table
                print(failure, flush=True)
                rows.append({"config": f"W{bits}A{bits}", "method": method, "metrics": None, "objective": None,
                             "seconds": None, "failed": failure, "extra": extra, "provenance": prov,
                             "names": NAMES})
            else:
                with open(os.path.join(folder, "metrics.json")) as f:
                    m = json.load(f)
                kept = same_fp32(rows, m["fp32"])
                if len(kept) < len([r for r in rows if r["config"] != "FP32"]):
                    commands = [_command(args, extra)]  # the earlier commands made the rows just dropped
                rows = kept
                rows.append({"config": "FP32", "method": "-", "metrics": m["fp32"], "objective": None,
                             "seconds": None, "names": NAMES})
                rows.append({"config": f"W{bits}A{bits}", "method": method, "metrics": m["quantized"],
                             "objective": m["calibration_objective"], "seconds": m.get("seconds"),
                             "recipe_seconds": seconds, "extra": extra, "provenance": prov, "names": NAMES,
                             "fp32": m["fp32"]})
            rows.sort(key=_row_order)
            md = write_results(args, extra, rows, commands, prov)  # after every row: a failed later run keeps the earlier ones
    print(md)


def same_fp32(rows, fp32):
    """``rows`` without the FP32 row and without the rows measured against another FP32 model.

    A recipe retrained into the same run folder is a new FP32 model: rows quantized from the old one
    are dropped (and named), so one table never compares calibrators across two models.
    """
    old = next((r["metrics"] for r in rows if r["config"] == "FP32"), None)
    stale = [r for r in rows if r["config"] != "FP32" and not r.get("failed") and
             not same_metrics(r.get("fp32", old), fp32)]
    if stale:
        print("FP32 result changed (the checkpoint was retrained?): dropping rows of the earlier model: " +
              ", ".join(f"{r['config']} {r['method']}" for r in stale), flush=True)
    dropped = {id(r) for r in stale}
    return [r for r in rows if r["config"] != "FP32" and id(r) not in dropped]


def same_metrics(a, b):
    """The same checkpoint evaluated again: equal up to float summation order (table2.py uses it too)."""
    if not a or set(a) != set(b):
        return a == b
    return all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-9) if isinstance(a[k], (int, float)) and
               isinstance(b[k], (int, float)) else a[k] == b[k] for k in a)


def _row_order(row):
    bits = 99 if row["config"] == "FP32" else int(row["config"][1:row["config"].index("A")])
    order = method_names()
    return -bits, order.index(row["method"]) if row["method"] in order else -1


def _previous_rows(args):
    """Rows and commands of an earlier results.json of the same recipe in ``--out``."""
    path = os.path.join(args.out, "results.json")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        previous = json.load(f)
    if previous.get("recipe") != args.train_py:
        return [], []
    return rename_rows(previous["rows"]), previous.get("commands", [])


def _command(args, extra):
    # positionals first: --bits / --methods take several values and would swallow them
    return "python benchmarks/sb_table1.py " + " ".join(
        [args.train_py, args.hparams, "--out", args.out] + (["--run-dir", args.run_dir] if args.run_dir else []) +
        (["--bits"] + [str(b) for b in args.bits]) + (["--methods"] + args.methods) +
        (["--"] + extra if extra else []))


def write_results(args, extra, rows, commands, prov):
    keys = sorted({k for r in rows for k in (r["metrics"] or {})})
    write_json(os.path.join(args.out, "results.json"), {"recipe": args.train_py, "hparams": args.hparams,
                                                         "extra": extra, "rows": rows, "commands": commands,
                                                         "provenance": prov})
    name = os.path.basename(os.path.dirname(os.path.abspath(args.train_py)))
    commits = sorted({_commit(r) for r in rows if r["config"] != "FP32"})
    renamed = sorted({f"{r['renamed_from']} → {r['method']}" for r in rows if r.get("renamed_from")})
    md = f"### {name}\n\n{table(rows, keys)}\n\n" + "\n".join(f"`{c}`  " for c in commands) + \
        "\n\nRows from commit(s): " + ", ".join(commits) + "\n" + \
        (f"\nRows run under earlier names (the commands above use them; same settings): {', '.join(renamed)}. "
         "`esc` is ESC with today's defaults (start = best of the output-MSE init and the baselines, "
         "σ0 = 0.3); `esc_paper` is the paper's settings (output-MSE init, σ0 = 0.1).\n" if renamed else "")
    write_bytes(os.path.join(args.out, "results.md"), md.encode())
    return md


def _commit(row):
    prov = row.get("provenance")
    if not prov:
        return "unrecorded (rows from before provenance was written)"
    return f"{prov.get('commit')}{' (uncommitted changes)' if prov.get('dirty') else ''}"


if __name__ == "__main__":
    main()
