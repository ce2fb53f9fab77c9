"""Weight clipping: per-channel weight scales that minimise the weight quantization error.

The paper quantizes weights per output channel with their Max. At 4 bits one
large weight per channel leaves the others on a handful of levels; a smaller
clip trades that one weight's error for a finer grid for the rest. For each
output channel this pass picks the clip ``r · max|w|`` (``r`` on a grid in
``[0.3, 1]``) minimising ``‖w − Q(w)‖²``, for every weight quantizer of the
copy (Linear, Conv, functional ``F.linear`` weights, embeddings). Runs before
calibration, so the activation calibrators see the final weights. Beyond the
paper; ``QuantConfig(ptq=("weight_clip",))``. No calibration pass.
"""
import torch

from ..numerics import MIN_AMAX, fake_quant
from ..registry import register_transform
from ..state import module_weight_quantizers

_RATIOS = torch.linspace(0.3, 1.0, 36)


def _weights(module, attr):
    return module.weight if attr == "weight" else module.get_parameter(_param_name(module, attr))


def _param_name(module, key):
    from ..functional import _safe  # modelopt: only when a model is quantized

    return next(n for n in module.esc_params if _safe(n) == key)


def _create_call_sites(ctx):
    """Functional F.linear weights get their quantizers at their first call: make that call."""
    lazy = [m for m in ctx.plan.modules.values() if getattr(m, "esc_params", None)
            and len(m.esc_weight_quantizers) < len(m.esc_params)]
    if lazy:
        ctx.plan.start_observing(lambda point: None)
        try:
            with torch.no_grad():
                ctx.forward_loop(ctx.model)
        finally:
            ctx.plan.stop_observing()


@torch.no_grad()
def best_channel_amax(weight, num_bits):
    """Per output channel (dim 0) the clip on the grid with the least squared error."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    top = w.abs().amax(1).clamp_min(MIN_AMAX)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for r in _RATIOS:
        amax = (top * r)[:, None]
        err = ((fake_quant(w, amax, num_bits) - w) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, amax[:, 0], best), torch.where(better, err, best_err)
    return best.reshape((-1,) + (1,) * (weight.dim() - 1))


@register_transform("weight_clip", stage="before_calibration",
                    summary="per-channel weight clip minimising the weight quantization MSE")
class WeightClip:
    def __init__(self, config):
        self.bits = config.weight_bits
        self.ratios = {}

    def apply(self, ctx):
        _create_call_sites(ctx)
        for name, module in ctx.plan.weight_owners():
            for attr, wq in module_weight_quantizers(module):
                weight = _weights(module, attr)
                amax = best_channel_amax(weight, self.bits)
                top = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(1).clamp_min(MIN_AMAX)
                self.ratios[f"{name}:{attr}"] = float((amax.reshape(-1) / top).mean())
                wq.amax = amax.to(device=wq.amax.device) if wq.amax is not None else amax
            module.__dict__.pop("_esc_qweight_cache", None)  # quantized weights depend on the new amax
        ctx.report.notes.append(f"weight_clip: {len(self.ratios)} weight tensors, mean clip ratio "
                                f"{sum(self.ratios.values()) / max(len(self.ratios), 1):.3f}")

    def state_dict(self):
        return {"ratios": dict(self.ratios)}

    def load_state_dict(self, state, ctx):
        # the per-channel weight amax themselves are restored from the state file's weight table
        self.ratios = dict(state["ratios"])
