"""``stablequant``: StableQuant (Hong et al., ICASSP 2025, arXiv 2504.14915) from its description.

The authors publish a built engine, not the calibration code, so this is an
implementation of the paper's description. Steps, and what follows the paper
versus what is our reading of it:

1. **Sensitivity** (paper): every active site is Max-calibrated; a site is
   *flagged* when quantizing it *alone* (every other site in float, its own
   weights quantized) raises the objective by more than a threshold over the
   FP32 model. *Ours*: the paper's threshold is 0.25 % absolute WER; our
   objectives are arbitrary task errors, so the threshold is relative,
   ``threshold`` (5 %, about 0.25 % WER on a 5 % WER model) times
   ``max(|f_fp32|, f_max - f_fp32)``, where ``f_max`` is the objective of the
   all-Max model. The second term keeps it meaningful when the FP32 objective
   is 0 (the label-free distillation objective, a distance to the FP32
   outputs): a site is then flagged when alone it costs more than 5 % of what
   Max calibration costs in all. "Alone" switches the other sites off the way
   accuracy fallback does (:func:`esc_plugin.core.float_sites.to_float`).
2. **Percentile clip** (paper) of each flagged site's |x| histogram, searched
   layer by layer. *Ours*: candidates ``percentiles`` (99.0 ... 99.999 %),
   scored on the objective of the *whole* quantized model (the other sites at
   their current scales), flagged sites visited from the most sensitive down,
   greedily (each keeps its best value before the next is searched).
3. **MSE-optimal scale** (paper). *Ours*: the clip minimising the MSE of the
   quantized input histogram (:func:`esc_plugin.core.histogram.mse_amax`, the
   ``mse`` calibrator's) is one more candidate of step 2, and the site keeps
   whichever of Max, the percentiles and the MSE clip scores best, so a step
   never makes the objective worse.
4. **Final quantization**: unflagged sites keep Max, flagged ones their choice.

Objective evaluations are bounded: ``2 + n_sites`` for step 1 (FP32, all-Max,
one per site) and at most ``QuantConfig.budget`` (Γ) for steps 2-3: flagged
sites beyond ``budget // candidates`` keep Max (the notes name them).
``report.notes`` records the counts, the threshold, the flagged sites and
each choice.

Without any objective (the pipeline gives optional calibrators the
distillation objective, so this happens only when another calibrator
composes it via ``ctx.baseline("stablequant")`` in a run without one), no
sensitivity can be measured: a site is flagged when Max's input-histogram MSE
is over ``label_free_ratio`` times the MSE-optimal clip's (Max wastes its
range there) and takes the MSE clip; the notes say so.

Example
-------
>>> import torch, esc_plugin as esc
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
>>> xs = [torch.randn(16, 4) for _ in range(2)]
>>> def loop(m):
...     for x in xs: m(x)
>>> q = esc.quantize(net, esc.QuantConfig(method="stablequant"), loop, progress=False)
>>> any(n.startswith("stablequant:") for n in q.esc_report.notes)
True
"""
import numpy as np
from tqdm.auto import tqdm

from ..errors import ObjectiveError
from ..float_sites import quantizers_of, to_float
from ..histogram import histogram_mse, mse_amax, percentile_amax
from ..registry import register_calibrator
from ..search import WORST_LOSS


def _restore(states):
    for q, enabled in states:
        q.enable() if enabled else q.disable()


@register_calibrator("stablequant", needs=("histogram",), objective="optional",
                     summary="StableQuant: Max, percentile/MSE clips for the layers sensitive alone")
class StableQuantCalibrator:
    threshold = 0.05          # flag: drop alone > threshold * max(|f_fp32|, f_max - f_fp32)
    percentiles = (99.0, 99.9, 99.99, 99.999)
    label_free_ratio = 2.0    # without an objective: flag when Max's histogram MSE > ratio x the MSE clip's

    def __init__(self, config):
        self.config = config
        self.flagged, self.choices, self.drops = [], {}, {}

    def calibrate(self, ctx):
        amax = ctx.maxes.copy()
        candidates = self._candidates(ctx)
        if not ctx.has_objective:
            return self._label_free(ctx, amax, candidates)
        start = ctx.evaluator.count
        f_fp32, f_max, drops = self._sensitivity(ctx, amax)
        tau = self.threshold * max(abs(f_fp32), f_max - f_fp32)
        # plain floats: state files are read with weights_only=True, which refuses numpy scalars
        self.drops = {p.name: float(d) for p, d in zip(ctx.sites, drops)}
        order = [i for i in np.argsort(-drops, kind="stable") if drops[i] > tau and ctx.maxes[i] > 0]
        self.flagged = [ctx.sites[i].name for i in order]
        n_search = self.config.budget // (len(self.percentiles) + 1)  # candidates per site, at most
        searched, skipped = order[:n_search], order[n_search:]
        score = f_max
        for i in tqdm(searched, desc="stablequant: clip search", disable=not ctx.progress):
            score = self._search_site(ctx, amax, i, candidates[i], score)
        report = ctx.report
        report.objective.update({"fp32": f_fp32, "max": f_max, "stablequant_threshold": tau, "final": score})
        report.notes.append(
            f"stablequant: {ctx.evaluator.count - start} objective evaluations ({len(ctx.sites) + 2} for the "
            f"sensitivity, {ctx.evaluator.count - start - len(ctx.sites) - 2} for the clip search); threshold "
            f"{tau:.4g} ({self.threshold:g} x max(|FP32 {f_fp32:.4g}|, Max drop {f_max - f_fp32:.4g})); "
            f"flagged {len(order)} of {len(ctx.sites)} site(s)")
        report.notes.extend(f"stablequant: {ctx.sites[i].name} drop alone {drops[i]:.4g} -> "
                            f"{self.choices[ctx.sites[i].name]}" for i in searched)
        if skipped:
            report.notes.append(f"stablequant: budget {self.config.budget} covers {len(searched)} flagged "
                                f"site(s); kept Max for {[ctx.sites[i].name for i in skipped]}")
        return amax

    def _candidates(self, ctx):
        """Per site ``[(label, amax), ...]``: the percentiles then the MSE clip (Max where never non-zero)."""
        bits = self.config.act_bits
        hobs = ctx.histograms()
        out = []
        for p, m in zip(ctx.sites, ctx.maxes):
            o = hobs.get(p.name)
            if o is None or o.hist is None or m <= 0:
                out.append([])
                continue
            h = o.hist.numpy()
            out.append([(f"p{pc:g}", percentile_amax(h, o.edges, pc)) for pc in self.percentiles]
                       + [("mse", mse_amax(h, o.edges, bits))])
        return out

    def _sensitivity(self, ctx, amax):
        """``(f_fp32, f_max, drop per site)``: the objective with every site in float, every site at Max,
        and each site alone at Max."""
        ctx.set_amax(amax)  # before any site is switched off: set_act_amax follows the enabled sites
        f_max = ctx.evaluate(None)
        sites = list(ctx.sites)
        # restored exactly afterwards (a pass may have left a weight quantizer off on purpose)
        saved = [[(q, q.is_enabled) for q in quantizers_of(p)] for p in sites]
        for p in sites:
            to_float(p, True)
        try:
            f_fp32 = ctx.evaluate(None)
            if f_fp32 >= WORST_LOSS:
                raise ObjectiveError("stablequant: the objective is NaN or inf on the FP32 model (every site in "
                                     "float): it must return a finite task error; check it on the FP32 model.")
            drops = []
            for p, states in tqdm(list(zip(sites, saved)), desc="stablequant: sensitivity",
                                  disable=not ctx.progress):
                _restore(states)  # this site alone back as it was: quantized
                drops.append(ctx.evaluate(None) - f_fp32)
                to_float(p, True)
        finally:
            for states in saved:
                _restore(states)
        return f_fp32, f_max, np.array(drops, dtype=np.float64)

    def _search_site(self, ctx, amax, i, candidates, score):
        """Keep the best of the current value (Max) and the candidates for site ``i``; returns the new score."""
        best_label, best_value, tried = "max", amax[i], {float(amax[i])}
        for label, value in candidates:
            if float(value) in tried or value <= 0:
                continue  # equal clips (a coarse histogram) cost no evaluation
            tried.add(float(value))
            trial = amax.copy()
            trial[i] = value
            s = ctx.evaluate(trial)
            if s < score:
                best_label, best_value, score = label, value, s
        amax[i] = best_value
        self.choices[ctx.sites[i].name] = f"{best_label} ({best_value:.4g})"
        return score

    def _label_free(self, ctx, amax, candidates):
        hobs, bits = ctx.histograms(), self.config.act_bits
        self.flagged = []
        for i, (p, cands) in enumerate(zip(ctx.sites, candidates)):
            if not cands:
                continue
            h, e = hobs[p.name].hist.numpy(), hobs[p.name].edges
            errors = {label: histogram_mse(h, e, v, bits) for label, v in cands}
            at_max = histogram_mse(h, e, amax[i], bits)
            if at_max > self.label_free_ratio * min(errors.values()):
                label = min(errors, key=errors.get)
                amax[i] = dict(cands)[label]
                self.flagged.append(p.name)
                self.choices[p.name] = f"{label} ({amax[i]:.4g})"
        ctx.report.notes.append(
            f"stablequant: no objective, so no sensitivity measured: flagged the {len(self.flagged)} of "
            f"{len(ctx.sites)} site(s) whose input-histogram MSE at Max is over {self.label_free_ratio:g}x the "
            f"best clip's, and gave them that clip; the others keep Max: {self.choices}")
        return amax

    def state_dict(self):
        return {"flagged": list(self.flagged), "choices": dict(self.choices), "drops": dict(self.drops)}

    def load_state_dict(self, state):
        self.flagged = list(state.get("flagged", []))
        self.choices = dict(state.get("choices", {}))
        self.drops = dict(state.get("drops", {}))
