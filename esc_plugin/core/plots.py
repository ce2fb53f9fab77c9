"""Plots people look at: CMA-ES convergence and per-layer activation ranges."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import _atomic  # noqa: E402


def _save(fig, path):
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_convergence(report, folder):
    losses = np.array([h["loss"] for h in report.history])
    gens = np.array([h["generation"] for h in report.history])
    finite = losses < 1e29
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(np.nonzero(finite)[0], losses[finite], s=8, alpha=0.4, label="candidate")
    best = np.minimum.accumulate(np.where(finite, losses, np.inf))
    ax.plot(best, color="C1", label="best so far")
    means = [losses[(gens == g) & finite].mean() for g in np.unique(gens) if ((gens == g) & finite).any()]
    ends = [np.nonzero(gens == g)[0][-1] for g in np.unique(gens) if ((gens == g) & finite).any()]
    ax.plot(ends, means, "o-", color="C2", label="generation mean")
    held = np.array([h.get("selection", np.nan) for h in report.history], dtype=float)
    if np.isfinite(held).any():  # the selection guard's held-back part, same candidates
        ok = np.isfinite(held) & (held < 1e29)
        ax.scatter(np.nonzero(ok)[0], held[ok], s=8, alpha=0.4, marker="x", color="C5",
                   label="candidate, held-back part")
        ax.plot(np.minimum.accumulate(np.where(ok, held, np.inf)), color="C5", ls=":",
                label="held-back best so far")
    for key, color in (("init", "C3"), ("final", "C4")):
        if key in report.objective:
            ax.axhline(report.objective[key], ls="--", color=color, label=f"{key} ({report.objective[key]:.4g})")
    ax.set_xlabel("objective evaluation")
    ax.set_ylabel("calibration objective (lower is better)")
    ax.set_title("ESC: CMA-ES convergence")
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(folder, "convergence.png"))


def plot_amax(report, folder):
    layers = report.layers
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7, len(layers) * 0.18), 4.5))
    ax.semilogy(x, [l.max for l in layers], "o-", ms=3, label="max")
    if any(l.init is not None for l in layers):
        ax.semilogy(x, [l.init or np.nan for l in layers], "s-", ms=3, label="init (ESC: output-MSE grid)")
    if any(l.final is not None for l in layers):
        ax.semilogy(x, [l.final or np.nan for l in layers], "^-", ms=3, label=f"final ({report.config['method']})")
    ax.set_xticks(x)
    ax.set_xticklabels([l.name for l in layers], rotation=90, fontsize=6)
    ax.set_ylabel("activation amax (log)")
    ax.set_title(f"Per-layer activation ranges, A{report.config['act_bits']}")
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(folder, "amax.png"))


def plot_sensitivity(report, folder, top=40):
    """Bar plot: objective gain when each op alone is left in float (the fallback's ranking)."""
    rows = report.sensitivity[:top]
    fig, ax = plt.subplots(figsize=(max(7, len(rows) * 0.22), 4.5))
    x = np.arange(len(rows))
    ax.bar(x, [r["gain"] for r in rows], color=["C3" if "float" in _reason(report, r["name"]) else "C0"
                                                  for r in rows])
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("objective gain with the op in float")
    ax.set_title(f"Per-op sensitivity, W{report.config['weight_bits']}A{report.config['act_bits']} "
                 "(red: left in float by the fallback)")
    return _save(fig, os.path.join(folder, "sensitivity.png"))


def _reason(report, name):
    return next((c.get("reason", "") for c in report.coverage if c["name"] == name), "")
