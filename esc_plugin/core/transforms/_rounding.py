"""Learned weight rounding shared by ``adaround`` and ``brecq`` (private).

A unit (one layer for AdaRound, one block for BRECQ) holds the sites whose
rounding is learned together. Per weight ``w`` with per-channel step
``1/scale`` (the site's weight quantizer, ``scale = qmax / amax``, left as
calibrated) the integer is ``clamp(floor(w·scale) + h, -qmax, qmax)``, with
``h = clip(sigmoid(V)(ζ−γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1) learned by Adam
on ``‖f(x_q; W̃) − f_fp32(x)‖² + λ Σ (1 − |2h − 1|^β)``, β annealed from 20
to 2 after a 20 % warm-up (Nagel et al., 2020). ``x_q`` is the unit's input
in the quantized model (activation quantizers at their calibrated amax,
earlier units already rounded); the target is the FP32 model's output of
the unit on the FP32 input, so each unit also absorbs the error of the ones
before it (the asymmetric reconstruction of AdaRound / BRECQ).

The result is the weight ``z / scale`` for integers ``z``: exactly the
values the weight quantizer produces, so it reproduces them (fake-quant of
the new weight is the identity) and exports unchanged. A unit whose learned
rounding has a larger error than nearest rounding on its recorded inputs
keeps nearest rounding.

Inputs are recorded over the first calls of ``ctx.forward_loop`` up to a
bounded size per unit; a pass stops (an internal exception) as soon as its
recorders are full, so one unit's pass costs only the batches it needs.
"""
import contextlib
import time

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from ..modules import _ORIG_LINEAR

ZETA, GAMMA = 1.1, -0.1
_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class Settings:
    """Class-level defaults (bounded so a CPU run of a small model takes seconds per layer)."""

    iters = 300            # Adam steps per unit (the papers use 10-20k)
    # The papers' 1e-3 is for 10-20k steps; in a bounded budget a 10x step is what lets the
    # roundings move from nearest and be decided by the annealed regulariser.
    lr = 1e-2
    reg_weight = 0.01      # λ
    beta = (20.0, 2.0)     # annealed from, to
    warmup = 0.2
    # recorded elements per unit and pass (Conv / block inputs: whole calls, until this many)
    max_elements = 1 << 17
    # Linear: recorded rows per site. Small enough that one batch of a speech model fills it, so
    # a layer's pass over the (quantized) model stops inside the first batch: the passes, one per
    # layer, cost more than the steps on a large model.
    max_rows = 512
    batch_rows = 256        # Linear rows (or Conv / block calls' items) per step


def reconstructable(point):
    """A Linear / Conv site with an enabled, calibrated weight quantizer, executed by the loop."""
    m = point.module
    wq = getattr(m, "weight_quantizer", None)
    return (point.op in ("linear", "conv1d", "conv2d") and isinstance(m, _KINDS) and wq is not None
            and wq.is_enabled and wq.amax is not None and point.input_quantizer.is_enabled
            and not getattr(point, "unused", False))


def candidate_layers(model, exclude):
    """Names of the FP32 model's layers that would become reconstructable sites (before any work)."""
    import fnmatch

    from ..modules import wrappable

    names, skipped = [], []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        if name and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            skipped.append(name)
            continue
        if isinstance(module, _KINDS) and wrappable(module):
            names.append(name)
    return names


def layer_op(point, x, weight):
    """The site's op on an already quantized input ``x`` with ``weight`` (autograd-friendly)."""
    m = point.module
    if point.op == "linear":
        return _ORIG_LINEAR(x, weight, m.bias)
    conv = next(c for c in type(m).__mro__ if c in (nn.Conv1d, nn.Conv2d))
    return conv._conv_forward(m, x, weight, m.bias)


class Rounding:
    """The learned rounding of one site's weight."""

    def __init__(self, point, bits):
        m = point.module
        self.point, self.qmax = point, float(2 ** (bits - 1) - 1)
        w = m.weight.detach().float()
        amax = m.weight_quantizer.amax.detach().float().to(w.device)
        self.scale = self.qmax / amax  # modelopt's arithmetic: z = round(w·scale), w_q = z / scale
        ws = w * self.scale
        self.floor = torch.floor(ws)
        rest = (ws - self.floor).clamp(0.0, 1.0)
        self.v = torch.logit(((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)).requires_grad_(True)
        self.nearest = torch.clamp(torch.round(ws), -self.qmax, self.qmax)
        self.dtype = m.weight.dtype

    def h(self):
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft(self):
        return (torch.clamp(self.floor + self.h(), -self.qmax, self.qmax) / self.scale).to(self.dtype)

    def hard_codes(self):
        return torch.clamp(self.floor + (self.v.detach() >= 0).float(), -self.qmax, self.qmax)

    def weight(self, codes):
        return (codes / self.scale).to(self.dtype)

    def regulariser(self, beta):
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class Enough(BaseException):
    """Stops ``forward_loop`` once every recorder of a pass is full (not an error of the loop)."""


class Tracker:
    def __init__(self):
        self.recorders = []

    def check(self):
        if all(r.full for r in self.recorders):
            raise Enough()


def run_pass(ctx, tracker, observe_fp32=False, factory=None):
    """One (early-stopped) pass of the forward loop, in FP32 (quantizers off) or quantized."""
    if observe_fp32:
        ctx.plan.start_observing(factory or (lambda point: None))
    try:
        with torch.no_grad():
            ctx.forward_loop(ctx.model)
    except Enough:
        pass
    finally:
        if observe_fp32:
            ctx.plan.stop_observing()


class Recorder:
    """The first rows (Linear) or items (Conv, blocks: along dim 0) of a stream of tensors."""

    def __init__(self, tracker, rows_of=None):
        self.parts, self.count, self.elements, self.full = [], 0, 0, False
        self.rows_of, self.limit, self.tracker = rows_of, Settings.max_elements, tracker
        tracker.recorders.append(self)

    def add(self, value):
        if self.full:
            return
        value = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, value)
        if self.rows_of is not None:  # a Linear input: keep rows, up to max_rows
            rows = value.reshape(-1, self.rows_of)
            value = rows[:max(1, min(Settings.max_rows - self.count, (self.limit - self.elements) // self.rows_of))]
            self.count += value.shape[0]
        self.parts.append(value)
        self.elements += sum(t.numel() for t in tree_leaves(value) if isinstance(t, torch.Tensor))
        self.full = self.elements >= self.limit or (self.rows_of is not None and self.count >= Settings.max_rows)
        self.tracker.check()


def first_tensor(output):
    return next(t for t in tree_leaves(output) if isinstance(t, torch.Tensor))


def row_loss(out, target, axis):
    """Squared error summed over the feature axis, averaged over the rest (AdaRound's ‖·‖²)."""
    return (out.float() - target.float()).pow(2).sum(axis).mean()


@contextlib.contextmanager
def one_thread():
    """Run the reconstruction steps on one CPU thread (restored after).

    Each step is a small op plus Adam: with several intra-op threads on a CPU
    shared with other work, waiting for the threads costs more than the op.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def optimise(roundings, loss_of, n_batches, settings, generator):
    """Adam on the roundings' V; ``loss_of(batch_index, weights)`` -> reconstruction loss."""
    params = [r.v for r in roundings]
    opt = torch.optim.Adam(params, lr=settings.lr)
    warm = int(settings.warmup * settings.iters)
    b0, b1 = settings.beta
    for it in range(settings.iters):
        i = int(torch.randint(n_batches, (1,), generator=generator))
        with torch.enable_grad():
            loss = loss_of(i, [r.soft() for r in roundings])
            if it >= warm:
                t = (it - warm) / max(settings.iters - warm, 1)
                beta = b1 + (b0 - b1) * max(0.0, 1 - t)
                loss = loss + settings.reg_weight * sum(r.regulariser(beta) for r in roundings)
            grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


@torch.no_grad()
def set_codes(point, codes, amax=None):
    """Replace the site's weight by ``codes / scale`` (a new parameter: tied weights stay as they are)."""
    m = point.module
    wq = m.weight_quantizer
    if amax is not None:
        wq.amax = amax.to(device=m.weight.device, dtype=torch.float32).clone()
    scale = float(2 ** (wq.num_bits - 1) - 1) / wq.amax.float()
    # through the quantizer itself: its arithmetic (modelopt's kernel) fixes the last bit, so
    # quantizing the stored weight again gives it back exactly
    new = wq((codes.to(m.weight.device).float() / scale).to(m.weight.dtype)).detach()
    m.weight = nn.Parameter(new, requires_grad=m.weight.requires_grad)
    m.__dict__.pop("_esc_qweight_cache", None)  # the cached fake-quant weight is of the old tensor


def finish(result, roundings, losses):
    """Keep learned or nearest codes per unit (whichever reconstructs better); store them."""
    nearest, learned = losses
    use_learned = learned <= nearest
    for r in roundings:
        codes = r.hard_codes() if use_learned else r.nearest
        set_codes(r.point, codes)
        result.codes[r.point.name] = codes.to(torch.int8).cpu()
        result.amax[r.point.name] = r.point.module.weight_quantizer.amax.detach().float().cpu().clone()
    result.losses.append((nearest, min(nearest, learned)))
    result.kept_nearest += 0 if use_learned else 1


class Result:
    """What a rounding pass produced (its ``state_dict``) and its report line."""

    def __init__(self):
        self.codes, self.amax, self.losses, self.kept_nearest, self.t0 = {}, {}, [], 0, time.perf_counter()

    def state_dict(self):
        return {"codes": dict(self.codes), "amax": dict(self.amax),
                "losses": [[float(a), float(b)] for a, b in self.losses]}

    def load_state_dict(self, state, ctx):
        by_name = {p.name: p for p in ctx.plan.points}
        self.codes, self.amax = dict(state["codes"]), dict(state["amax"])
        self.losses = [tuple(x) for x in state.get("losses", [])]
        for name, codes in self.codes.items():
            set_codes(by_name[name], codes, self.amax[name])

    def note(self, name, units, skipped):
        n = max(len(self.losses), 1)
        before = sum(a for a, _ in self.losses) / n
        after = sum(b for _, b in self.losses) / n
        return (f"{name}: reconstructed {len(self.codes)} weight tensors in {units}, "
                f"{Settings.iters} iterations each; reconstruction loss (mean per unit) {before:.4g} "
                f"(nearest rounding) -> {after:.4g}; {self.kept_nearest} unit(s) kept nearest rounding; "
                f"left at nearest: {skipped}; {time.perf_counter() - self.t0:.1f} s")
