"""Paper Table 2: ESC alone against ESC + each PTQ pass, at W8A8 / W4A4.

Rows (each at every ``--bits``): the base configuration alone (``--base``, a
preset name, default ``esc``: its settings come from
:func:`esc_plugin.core.presets.config_for`, never from this script), then the
base plus each pass of ``--passes`` alone, then each ``--combos`` entry
(passes joined by ``+``, run in the registry's canonical order: the
before-calibration passes, then the after-calibration ones, each stage by its
``order``). The default ``--passes`` is every registered pass except
``fallback``, which leaves ops in float (accuracy control, not a
quantization method of Table 2). ``--set KEY=VALUE`` applies a
:class:`QuantConfig` option to every row of the run (e.g.
``bias_correction_error=weight``); those rows are named with it
(``esc+bias_correction[bias_correction_error=weight]``), so they sit beside
the rows of the defaults and are compared with the base row of the same
settings.

Columns: the test metric, its difference to the base alone at the same bits
with an explicit *worse than <base> alone* flag, the calibration objective,
the passes as they ran with their seconds (``report.ptq``) and the total
time. A pass that cannot apply to the model (``ConfigError`` /
``CalibrationError``) is a row *not applicable: <message>*; any other error a
row *failed: <error>*; the table goes on. ``results.json`` / ``results.md``
(with every command and commit) are rewritten after every row; rows already
there for the same task are kept unless re-run.

Two back ends: ``--task honk | whisper | package.module:function`` runs in
this process (``benchmarks/quality.py``'s :func:`run_config`, test split of
the task); ``--recipe train.py hparams.yaml -- <recipe args>`` re-runs a
SpeechBrain recipe with ``--quantize=<base>`` and a ``quantization:`` block
carrying ``ptq: [...]`` (``benchmarks/sb_table1.py``'s helpers), reading the
stage's ``metrics.json`` and ``report.json``::

    python benchmarks/table2.py --task honk --bits 4 --out benchmarks/results/table2_honk
    python benchmarks/table2.py --recipe recipes/SpeechCommands/KWS/ast/train.py \\
        recipes/SpeechCommands/KWS/ast/hparams/ast.yaml --out benchmarks/results/table2_ast \\
        -- --data_folder=../shared/data/speech_commands
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_plugin.core.errors import CalibrationError, ConfigError  # noqa: E402
from esc_plugin.core.io import write_bytes, write_json  # noqa: E402
from esc_plugin.core.presets import config_for, preset_options  # noqa: E402
from esc_plugin.core.registry import STAGES, get_transform, transform_names  # noqa: E402
from esc_plugin.runner import provenance  # noqa: E402
from sb_table1 import same_metrics  # noqa: E402

# fallback leaves the most sensitive ops in float: accuracy control, not a PTQ method of Table 2
NOT_TABLE2 = ("fallback",)
NOT_APPLICABLE = (ConfigError, CalibrationError)


def default_passes():
    """Every registered pass except :data:`NOT_TABLE2`, in registration order."""
    return [n for n in transform_names() if n not in NOT_TABLE2]


def canonical(passes):
    """``passes`` in the order the pipeline requires: stage, then ``order`` (stable for ties)."""
    specs = [get_transform(n) for n in passes]
    return tuple(s.name for s in sorted(specs, key=lambda s: (STAGES.index(s.stage), s.order)))


def parse_settings(items):
    """``["key=value", ...]`` as a dict, each value read as YAML (numbers, booleans, strings).

    >>> parse_settings(["bias_correction_error=weight", "smoothquant_alpha=0.8"])
    {'bias_correction_error': 'weight', 'smoothquant_alpha': 0.8}
    """
    import yaml

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set bias_correction_error=weight.")
        settings[key] = yaml.safe_load(value)
    return settings


def settings_tag(settings):
    """The suffix naming the rows run with ``settings`` ('' for none).

    >>> settings_tag({"bias_correction_error": "weight"})
    '[bias_correction_error=weight]'
    """
    return "[" + ",".join(f"{k}={v}" for k, v in sorted(settings.items())) + "]" if settings else ""


def table_rows(base, passes, combos, tag=""):
    """``[(row name, passes)]``: the base alone, each pass alone, then each combo; bad names refused.

    >>> [name for name, _ in table_rows("esc", ["bias_correction"], ["bias_correction+smoothquant"])]
    ['esc', 'esc+bias_correction', 'esc+smoothquant+bias_correction']
    """
    valid = transform_names()
    groups = [(p,) for p in passes] + [tuple(c.split("+")) for c in combos]
    rows = [(base + tag, ())]
    for group in groups:
        bad = [n for n in group if n not in valid]
        if bad:
            raise ConfigError(f"--passes / --combos: {', '.join(map(repr, bad))} is not a registered pass: "
                              f"choose from {', '.join(valid)}.")
        if len(set(group)) != len(group):
            raise ConfigError(f"--combos {'+'.join(group)} names a pass twice: list each pass once.")
        group = canonical(group)
        name = "+".join((base,) + group) + tag
        if name not in [r[0] for r in rows]:
            rows.append((name, group))
    return rows


def row_config(base, bits, passes, overrides):
    """The base preset's :class:`QuantConfig` at ``bits`` with ``passes`` after its own."""
    own = tuple(preset_options(base).get("ptq", ()))
    return config_for(base, bits=bits, ptq=canonical(own + tuple(p for p in passes if p not in own)),
                      **overrides)


def row_base(row):
    """The preset a row's passes were added to: its name before the first ``+`` or ``[``."""
    return row["row"].split("+")[0].split("[")[0]


def compare(rows, base, higher_is_better):
    """Set each row's ``delta`` (metric − its base row's at the same bits and ``--set`` settings) and
    ``worse`` flag. ``base`` is the latest run's; rows of runs with another ``--base`` in the same
    folder are compared with their own base alone, never with this one."""
    ref = {(r["config"], r.get("tag", ""), row_base(r)): r["metric"] for r in rows
           if r["row"] == row_base(r) + r.get("tag", "") and r["metric"] is not None}
    for r in rows:
        b = ref.get((r["config"], r.get("tag", ""), row_base(r)))
        ok = r["metric"] is not None and b is not None and r["row"] != "FP32"
        r["delta"] = r["metric"] - b if ok else None
        r["worse"] = bool(ok and (r["delta"] < 0 if higher_is_better else r["delta"] > 0))
    return rows


def markdown(meta, rows):
    bases = {row_base(r) for r in rows if r["row"] != "FP32"}
    base = meta["base"] if bases <= {meta["base"]} else "its base"
    arrow = "↑" if meta["higher_is_better"] else "↓"
    lines = [f"| config | row | {meta['metric']} {arrow} | Δ vs {base} alone | worse than {base} alone | "
             "other metrics | calib. objective ↓ | passes as run (s) | time (s) | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        num = (lambda v, f: "-" if v is None else format(v, f))
        worse = "**yes**" if r["worse"] else ("-" if r["delta"] is None else "no")
        ran = ", ".join(f"{p['name']} {p['seconds']:.1f}" for p in r.get("ptq") or []) or "-"
        metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        others = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                           if k != meta["metric"] and isinstance(v, (int, float))) or "-"
        lines.append(f"| {r['config']} | {r['row']} | {num(r['metric'], '.4g')} | {num(r['delta'], '+.4g')} | "
                     f"{worse} | {others} | {num(r['calib_objective'], '.4g')} | {ran} | {num(r['seconds'], '.1f')} | "
                     f"{r['status'].replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines)


def write_results(out, meta, rows):
    """results.json and results.md (table, then every command and commit the rows came from)."""
    compare(rows, meta["base"], meta["higher_is_better"])
    write_json(os.path.join(out, "results.json"), {**meta, "rows": rows})
    provs = [r["provenance"] for r in rows if r.get("provenance")]
    commands = list(dict.fromkeys("python " + " ".join(p["command"]) for p in provs))
    commits = sorted({f"{p['commit']}{' (uncommitted changes)' if p['dirty'] else ''}" for p in provs})
    bases = " / ".join(sorted({row_base(r) for r in rows if r["row"] != "FP32"} | {meta["base"]}))
    md = (f"### {meta['name']}: {bases} alone vs {bases} + each PTQ pass "
          f"(objective: {meta['objective']})\n\n{markdown(meta, rows)}\n\n" +
          "".join(f"Command: `{c}`  \n" for c in commands) + f"Rows from commit(s): {', '.join(commits)}\n")
    write_bytes(os.path.join(out, "results.md"), md.encode())


def merge(rows, new):
    """``rows`` with ``new`` replacing the row of the same config and name."""
    return [r for r in rows if (r["config"], r["row"]) != (new["config"], new["row"])] + [new]


def rows_of_this_fp32(rows, fp32, fresh):
    """``rows`` less those measured against another FP32 model (the recipe was retrained, e.g. on
    another machine): one table never compares passes across two models. ``fresh``: the
    ``(config, row)`` keys measured in this run, which are kept."""
    old = next((r for r in rows if r["row"] == "FP32"), None)
    if old is None or same_metrics(old.get("metrics"), fp32.get("metrics")):
        return rows
    stale = [r for r in rows if r["row"] != "FP32" and (r["config"], r["row"]) not in fresh]
    if stale:
        print("FP32 result changed (the checkpoint was retrained?): dropping rows of the earlier model: "
              + ", ".join(f"{r['config']} {r['row']}" for r in stale), flush=True)
    return [r for r in rows if r["row"] != "FP32" and all(r is not s for s in stale)]


def previous_rows(out, name):
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        previous = json.load(f)
    return previous["rows"] if previous.get("name") == name else []


def failed_row(config, name, passes, error, prov):
    status = ("not applicable: " if isinstance(error, NOT_APPLICABLE) else "failed: ") + \
        (str(error) if isinstance(error, NOT_APPLICABLE) else f"{type(error).__name__}: {error}")
    return {"config": config, "row": name, "passes": list(passes), "status": status, "metric": None,
            "metrics": None, "calib_objective": None, "ptq": [], "seconds": None, "provenance": prov}


# ------------------------------------------------------------------ in-process tasks (quality.py)

def task_backend(args, overrides):
    """``(meta, fp32 row, run(name, passes, bits) -> row)`` for ``--task``."""
    import torch
    from quality import run_config
    from esc_plugin.tasks import get_task

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    with torch.no_grad():
        fp32 = {"config": "FP32", "row": "FP32", "passes": [], "status": "ok", "ptq": [], "seconds": None,
                "metrics": task.evaluate(task.model), "calib_objective": float(task.objective(task.model))}
    fp32["metric"] = fp32["metrics"][task.metric]
    meta = {"name": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "info": task.info}

    def run(name, passes, bits):
        config = row_config(args.base, bits, passes, overrides)
        r = run_config(task, name, config, args.objective == "task", args.progress)
        return {"config": r["config"], "row": name, "passes": list(passes), "status": "ok",
                "metric": r["metrics"][task.metric], "metrics": r["metrics"], "calib_objective": r["calib_objective"],
                "ptq": r["ptq"], "seconds": r["seconds"], "n_evaluations": r["n_evaluations"], "notes": r["notes"]}

    return meta, fp32, run


# ------------------------------------------------------------------ SpeechBrain recipes (sb_table1.py)

def recipe_backend(args, overrides, extra):
    """``--recipe``: each row is a run of the recipe's train.py; its stage writes the metrics."""
    from sb_table1 import quantization_block, recipe_options, run_recipe

    train_py, hparams = args.recipe
    run_dir = args.run_dir or os.path.join(args.out, "run")
    log = os.path.join(args.out, "recipe.log")
    key = {"metric": args.metric}
    meta = {"name": os.path.basename(os.path.dirname(os.path.abspath(train_py))), "recipe": train_py,
            "hparams": hparams, "extra": extra, "higher_is_better": args.higher_is_better}
    fp32 = {}

    def run(name, passes, bits):
        quantize, options = recipe_options(args.base)
        config = row_config(args.base, bits, passes, overrides)  # checks the combination before the run
        folder = os.path.join(run_dir, "quantized", f"{folder_name(name)}_w{bits}a{bits}")
        block = {"bits": bits, **options, **overrides, "ptq": list(config.ptq), "output_folder": folder,
                 **({"objective": "distill"} if args.objective == "distill" else {})}
        start = os.path.getsize(log) if os.path.exists(log) else 0  # this run's part of the shared log
        try:
            recipe_seconds = run_recipe(train_py, hparams, extra + [f"--output_folder={run_dir}",
                                        f"--quantize={quantize}", f"--quantization={quantization_block(block)}"],
                                        log)
        except SystemExit as e:  # the recipe's own error, from the end of its log
            raise _recipe_error(log, start) or RuntimeError(str(e))
        with open(os.path.join(folder, "metrics.json")) as f:
            m = json.load(f)
        with open(os.path.join(folder, "report.json")) as f:
            ptq = json.load(f).get("ptq", [])
        key["metric"] = key["metric"] or next((k for k in m["quantized"] if k.endswith("_objective")), None)
        meta["metric"] = key["metric"]
        fp32.update({"config": "FP32", "row": "FP32", "passes": [], "status": "ok", "metrics": m["fp32"],
                     "metric": m["fp32"].get(key["metric"]), "calib_objective": m["calibration_objective"]["fp32"],
                     "ptq": [], "seconds": None})
        return {"config": f"W{bits}A{bits}", "row": name, "passes": list(passes), "status": "ok",
                "metric": m["quantized"].get(key["metric"]), "metrics": m["quantized"],
                "calib_objective": m["calibration_objective"]["quantized"], "ptq": ptq, "seconds": m.get("seconds"),
                "recipe_seconds": recipe_seconds}

    meta["metric"] = args.metric
    return meta, fp32, run


def folder_name(row):
    """A row's output folder name: ``+`` and the ``--set`` tag's brackets spelled as path-safe characters.

    >>> folder_name("esc+bias_correction[bias_correction_error=weight]")
    'esc-bias_correction-bias_correction_error-weight'
    """
    return re.sub(r"[+\[=,]", "-", row).replace("]", "")


def _recipe_error(log, start=0):
    """The last ``ConfigError`` / ``CalibrationError`` line the recipe wrote to ``log`` after byte
    ``start`` (its own run, not an earlier row's), as that error."""
    with open(log, errors="replace") as f:
        f.seek(start)
        tail = f.readlines()[-200:]
    for line in reversed(tail):
        for cls in NOT_APPLICABLE:
            if f"{cls.__name__}: " in line:
                return cls(line.split(f"{cls.__name__}: ", 1)[1].strip())
    return None


def _row_order(row):
    """FP32, then by bits; the base alone, each pass alone in registry order, then the combos: the
    same order whichever runs produced the rows."""
    bits = 99 if row["config"] == "FP32" else int(row["config"][1:row["config"].index("A")])
    names = transform_names()
    return (-bits, len(row["passes"]) > 1, [names.index(p) if p in names else len(names) for p in row["passes"]],
            row.get("tag", ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="honk | whisper | package.module:function (in-process)")
    src.add_argument("--recipe", nargs=2, metavar=("TRAIN_PY", "HPARAMS"), help="a SpeechBrain recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    p.add_argument("--base", default="esc", help="preset the passes are added to (default: esc)")
    p.add_argument("--passes", nargs="*", default=None, help="passes run alone (default: every registered pass "
                                                              f"except {', '.join(NOT_TABLE2)}; "
                                                              "--passes with no name: none, only --combos)")
    p.add_argument("--combos", nargs="+", default=[], help="pass combinations, e.g. smoothquant+bias_correction")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                   help="QuantConfig options for every row, e.g. bias_correction_error=weight (rows named with them)")
    p.add_argument("--objective", choices=("task", "distill"), default="task",
                   help="task: the task's / recipe's calibration metric (default); distill: label-free")
    p.add_argument("--budget", type=int, help="override the preset's budget (default: the preset's)")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--run-dir", help="--recipe: the recipe's --output_folder (default <out>/run)")
    p.add_argument("--metric", help="--recipe: headline metric key (default: the stage's *_objective key)")
    p.add_argument("--higher-is-better", action="store_true", help="--recipe: direction of --metric")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # recipe arguments, split before argparse
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    prov = provenance(["benchmarks/table2.py", *argv])
    overrides = {k: v for k, v in (("budget", args.budget), ("seed", args.seed)) if v is not None}
    try:  # every name and every row's config, before any work
        settings = parse_settings(args.settings)
        overrides.update(settings)
        tag = settings_tag(settings)
        specs = table_rows(args.base, default_passes() if args.passes is None else args.passes, args.combos, tag)
        for bits in args.bits:
            for _, passes in specs:
                row_config(args.base, bits, passes, overrides)
        os.makedirs(args.out, exist_ok=True)
    except (ConfigError, OSError) as e:
        raise SystemExit(f"error: {e}")
    meta, fp32, run = (task_backend(args, overrides) if args.task else recipe_backend(args, overrides, extra))
    meta.update({"base": args.base, "objective": args.objective})
    rows, fresh = previous_rows(args.out, meta["name"]), set()
    for bits in args.bits:
        for name, passes in specs:
            t = time.perf_counter()
            try:
                row = run(name, passes, bits)
            except Exception as e:  # noqa: BLE001 -- a pass that cannot run is a row, not the end of the table
                row = failed_row(f"W{bits}A{bits}", name, passes, e, prov)
            row["provenance"], row["wall_seconds"], row["tag"] = prov, time.perf_counter() - t, tag
            rows = merge(rows, row)
            fresh.add((row["config"], row["row"]))
            if fp32:
                rows = merge(rows_of_this_fp32(rows, fp32, fresh), dict(fp32, provenance=prov))
            rows.sort(key=_row_order)
            write_results(args.out, meta, rows)  # after every row: a later failure keeps the earlier ones
            print(f"{meta['name']} W{bits}A{bits} {name}: {row['status']} metric={row['metric']} "
                  f"({row['wall_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
