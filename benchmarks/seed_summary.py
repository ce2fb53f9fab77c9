"""Seed robustness: group a ``table2.py`` results file's rows by their settings without the seed.

A seed study is ``table2.py`` run once per seed with ``--passes`` (no pass) and
``--set seed=<k> [other settings]``; its rows are named ``esc[seed=k,...]``.
This script groups them by (bits, row name without ``seed=k``) and writes, per
group, the metric of every seed, the mean, the worst and the best, so a search
setting is judged on its spread, not on one lucky seed::

    python benchmarks/seed_summary.py benchmarks/results/seeds_ast

writes ``seeds.md`` next to the ``results.json`` it reads (the results file is
not changed).
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_plugin.core.io import write_bytes  # noqa: E402

def split_seed(row_name):
    """``(name without the seed setting, seed)``; seed ``None`` when the row has no ``seed=``.

    >>> split_seed("esc[seed=3,sigma0=0.5]")
    ('esc[sigma0=0.5]', 3)
    >>> split_seed("esc[seed=1]")
    ('esc', 1)
    >>> split_seed("esc_paper")
    ('esc_paper', None)
    """
    base, sep, tag = row_name.partition("[")
    settings = tag.rstrip("]").split(",") if sep else []
    seeds = [s for s in settings if s.startswith("seed=")]
    if not seeds:
        return row_name, None
    rest = ",".join(s for s in settings if s not in seeds)
    return (f"{base}[{rest}]" if rest else base), int(seeds[0][len("seed="):])


def summarise(rows, higher_is_better):
    """``[{config, setting, seeds: {seed: metric}, mean, worst, best}]`` for rows with a seed."""
    groups = {}
    for r in rows:
        setting, seed = split_seed(r["row"])
        if seed is None or r.get("metric") is None:
            continue
        groups.setdefault((r["config"], setting), {})[seed] = r["metric"]
    worst, best = (min, max) if higher_is_better else (max, min)
    return [{"config": c, "setting": s, "seeds": dict(sorted(m.items())), "mean": statistics.fmean(m.values()),
             "worst": worst(m.values()), "best": best(m.values())} for (c, s), m in sorted(groups.items())]


def to_markdown(name, metric, summary):
    seeds = sorted({k for g in summary for k in g["seeds"]})
    head = ["config", "setting", *[f"seed {k}" for k in seeds], "mean", "worst", "best"]
    lines = [f"### {name}: {metric} over CMA-ES / sampling seeds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in summary:
        cells = [g["config"], f"`{g['setting']}`"] + [f"{g['seeds'][k]:.4g}" if k in g["seeds"] else "-"
                                                      for k in seeds]
        lines.append("| " + " | ".join(cells + [f"{g[k]:.4g}" for k in ("mean", "worst", "best")]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a table2.py --out folder (holding results.json)")
    args = p.parse_args(argv)
    path = os.path.join(args.results, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: pass the --out folder of a benchmarks/table2.py run.")
    with open(path) as f:
        results = json.load(f)
    summary = summarise(results["rows"], bool(results.get("higher_is_better", True)))
    if not summary:
        raise SystemExit(f"error: no row of {path} has a seed: run table2.py with --set seed=<k>.")
    text = to_markdown(results.get("name", "results"), results.get("metric") or "metric", summary)
    write_bytes(os.path.join(args.results, "seeds.md"), text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
