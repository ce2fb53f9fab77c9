"""One summary table over the SpeechBrain recipes' Table 1 runs (``benchmarks/sb_table1.py``).

Reads ``benchmarks/results/sb_*/results.json`` and prints, per recipe, FP32,
then for W8A8 and W4A4 the best baseline (every registered calibrator other
than esc), ESC with its defaults, and the best ESC variant (``esc_paper``,
``esc_loss``...) if any was run;
a recipe with no results folder is listed as skipped; ESC's relative gap to FP32 and whether it is
the best calibrator are computed, not typed::

    python benchmarks/sb_summary.py > benchmarks/results/sb_summary.md
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from esc_plugin.core.registry import calibrator_names  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sb_table1 import rename_rows  # noqa: E402  (rows of older results under today's names)

RESULTS = Path(__file__).resolve().parent / "results"
# baselines: the calibrators that never run the search (every registered one but esc)
BASELINES = tuple(n for n in calibrator_names() if n != "esc")
# recipe folder -> (metric key, label, lower is better)
METRICS = {
    "sb_conformer_ctc": ("WER", "WER %", True),
    "sb_ast": ("accuracy", "accuracy %", False),
    "sb_honk_res8": ("accuracy", "accuracy %", False),
    "sb_ecapa": ("EER", "EER %", True),
    "sb_ge2e": ("EER", "EER %", True),
    "sb_voicebank_cnntransformer": ("pesq", "PESQ", False),
    "sb_fastspeech2": ("total_mel_loss", "mel+PostNet MSE", True),
}


def _value(row, key):
    value = (row.get("metrics") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _best(rows, key, lower, methods):
    scored = [(r["method"], _value(r, key)) for r in rows if r["method"] in methods and _value(r, key) is not None]
    if not scored:
        return None, None
    return (min if lower else max)(scored, key=lambda mv: mv[1])


def _gap(gap):
    """Relative gap to FP32, in words (> 0: worse)."""
    if abs(gap) < 0.05:
        return "= FP32"
    return f"{abs(gap):.1f} % {'worse' if gap > 0 else 'better'} than FP32"


def summarise(folder, key, label, lower):
    data = json.loads((folder / "results.json").read_text())
    rows = rename_rows(data["rows"])
    fp32 = next(_value(r, key) for r in rows if r["config"] == "FP32")
    cells = [folder.name.removeprefix("sb_"), label + (" ↓" if lower else " ↑"), f"{fp32:.4g}"]
    for config in ("W8A8", "W4A4"):
        at = [r for r in rows if r["config"] == config]
        base_name, base = _best(at, key, lower, BASELINES)
        esc = _value(next((r for r in at if r["method"] == "esc"), {}), key)
        var_name, var = _best(at, key, lower, [r["method"] for r in at if r["method"].startswith("esc_")])
        if esc is None:
            cells += [f"{base:.4g} ({base_name})" if base is not None else "–", "not run with the defaults",
                      f"{var:.4g} ({var_name})" if var is not None else "–"]
            continue
        gap = (esc - fp32) / abs(fp32) * 100 * (1 if lower else -1)  # > 0: worse than FP32
        wins = base is None or (esc <= base if lower else esc >= base)
        cells += [f"{base:.4g} ({base_name})" if base is not None else "–",
                  f"{esc:.4g} ({_gap(gap)}{'; best calibrator' if wins else ''})",
                  f"{var:.4g} ({var_name})" if var is not None else "–"]
    return "| " + " | ".join(cells) + " |"


def main():
    lines = ["| recipe | metric | FP32 | W8A8 best baseline | W8A8 ESC | W8A8 ESC variant | "
             "W4A4 best baseline | W4A4 ESC | W4A4 ESC variant |", "|" + "---|" * 9]
    missing = []
    for name, (key, label, lower) in METRICS.items():
        folder = RESULTS / name
        if (folder / "results.json").exists():
            lines.append(summarise(folder, key, label, lower))
        else:
            missing.append(name)
    print("\n".join(lines))
    for name in missing:
        path = (RESULTS / name / "results.json").relative_to(RESULTS.parent.parent)
        print(f"\n{name.removeprefix('sb_')}: skipped, no {path} (run benchmarks/sb_table1.py for it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
