"""BRECQ: learn the weights' rounding block by block.

The rounding parametrisation and regulariser are AdaRound's
(:mod:`esc_plugin.core.transforms.adaround`); the reconstruction target is a
*block's* output (Li et al., 2021), so the rounding of the layers of one
block compensates each other's error. A block is found from the module
tree: an entry of an ``nn.ModuleList``, or one of ≥ 2 entries of one class
of an ``nn.Sequential``, holding ≥ 2 quantized ``nn.Linear`` /
``nn.Conv1d`` / ``nn.Conv2d`` layers (transformer / conformer layers,
residual blocks); the outermost such modules are the blocks. Quantized
layers outside every block are reconstructed layer-wise, as AdaRound does.
Blocks and layers run in execution order; each is reconstructed on its input
in the quantized model (earlier ones already rounded) against the FP32
model's output. A model without any block is refused before any work
(use ``adaround`` for it).

Example
-------
>>> import torch, esc_plugin as esc
>>> from esc_plugin.core.transforms.brecq import find_blocks
>>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32), num_layers=2)
>>> [name for name, _ in find_blocks(enc, lambda m: isinstance(m, torch.nn.Linear))]
['layers.0', 'layers.1']
"""
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigError
from ..registry import register_transform
from . import _rounding as R
from .adaround import (RoundingPass, check_has_layers, fp32_observers, reconstruct_layer, reconstructable_points,
                       skipped_sites)

LOOKED_FOR = ("entries of an nn.ModuleList, or ≥ 2 entries of one class of an nn.Sequential, each holding "
              "≥ 2 quantized nn.Linear / nn.Conv1d / nn.Conv2d layers (transformer / conformer layers, "
              "residual blocks)")


def find_blocks(root, is_site):
    """``(name, module)`` of the outermost blocks of ``root`` (see the module docstring)."""
    blocks = []

    def n_sites(module):
        return sum(1 for m in module.modules() if is_site(m))

    def visit(prefix, module):
        children = list(module.named_children())
        chosen = set()
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            by_class = {}
            for name, child in children:
                by_class.setdefault(type(child), []).append(name)
            for name, child in children:
                repeated = isinstance(module, nn.ModuleList) or len(by_class[type(child)]) >= 2
                if repeated and n_sites(child) >= 2:
                    blocks.append((prefix + name, child))
                    chosen.add(name)
        for name, child in children:
            if name not in chosen:
                visit(prefix + name + ".", child)

    visit("", root)
    return blocks


def _record_block_fp32(tracker, blocks, order):
    recorders, handles = {}, []
    for name, block in blocks:
        rec = recorders[name] = R.Recorder(tracker)

        def hook(module, args, kwargs, output, rec=rec, name=name):
            if not rec.parts:
                order.append(name)
            rec.add(R.first_tensor(output))  # the target only
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    return recorders, handles


def _record_block_quantized(ctx, block):
    tracker = R.Tracker()
    rec = R.Recorder(tracker)
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: rec.add((args, kwargs)) and None,
                                             with_kwargs=True)
    try:
        R.run_pass(ctx, tracker)
    finally:
        handle.remove()
    return rec.parts


def reconstruct_block(ctx, name, block, points, fp32_parts, result, generator):
    """Learn the rounding of every site in ``block`` together, on the block's output."""
    quant_parts = _record_block_quantized(ctx, block)
    # clones: a forward loop run under torch.inference_mode records tensors autograd cannot save
    pairs = [tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (a, k, t))
             for (a, k), t in zip(quant_parts, fp32_parts)]
    if not pairs:
        return False
    roundings = [R.Rounding(p, ctx.config.weight_bits) for p in points]
    keys = [p.name[len(name) + 1:] + ".weight" for p in points]
    quantizers = [p.module.weight_quantizer for p in points]

    def run(i, weights):
        args, kwargs, target = pairs[i]
        out = R.first_tensor(torch.func.functional_call(block, dict(zip(keys, weights)), args, kwargs))
        return R.row_loss(out, target, -1)

    @torch.no_grad()
    def full_loss(codes):
        weights = [r.weight(c) for r, c in zip(roundings, codes)]
        return sum(float(run(i, weights)) for i in range(len(pairs))) / len(pairs)

    # the soft weights go through as they are: the block's own weight quantizers are off meanwhile
    for q in quantizers:
        q.disable()
    try:
        with R.one_thread():
            nearest = full_loss([r.nearest for r in roundings])
            R.optimise(roundings, run, len(pairs), R.Settings, generator)
            learned = full_loss([r.hard_codes() for r in roundings])
    finally:
        for q in quantizers:
            q.enable()
    R.finish(result, roundings, (nearest, learned))
    return True


@register_transform("brecq", stage="after_calibration", order=20,
                    summary="learn the weights' rounding block by block (BRECQ: transformer / residual blocks)")
class BRECQ(RoundingPass):
    def check(self, model):
        check_has_layers(model, self.config, "brecq")
        names = R.candidate_layers(model, self.config.exclude)
        modules = dict(model.named_modules())
        layers = {id(modules[n]) for n in names}
        if not find_blocks(model, lambda m: id(m) in layers):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"ptq=('brecq',): no block found in {type(model).__name__}: looked for {LOOKED_FOR}; its "
                f"quantized layers are {shown}, none grouped so. Use ptq=('adaround',) (layer-wise "
                "reconstruction) for this model.")

    def apply(self, ctx):
        points = reconstructable_points(ctx, "brecq")
        modules = {id(p.module): p for p in points}
        blocks = find_blocks(ctx.model, lambda m: id(m) in modules)
        if not blocks:
            raise CalibrationError(f"ptq=('brecq',): no block found among the executed sites: looked for "
                                   f"{LOOKED_FOR}.")
        inside = {name: [p for p in points if p.name.startswith(name + ".")] for name, _ in blocks}
        in_blocks = {p.name for ps in inside.values() for p in ps}
        layers = [p for p in points if p.name not in in_blocks]
        self.result = R.Result()
        tracker, order = R.Tracker(), []
        layer_recs, factory = fp32_observers(tracker, layers, order)
        block_recs, handles = _record_block_fp32(tracker, blocks, order)
        try:
            R.run_pass(ctx, tracker, observe_fp32=True, factory=factory)
        finally:
            for h in handles:
                h.remove()
        by_name = dict(blocks)
        points_by_name = {p.name: p for p in layers}
        generator = torch.Generator().manual_seed(ctx.config.seed)
        n_blocks = 0
        for name in tqdm(order, desc="brecq", disable=not ctx.progress):
            if name in by_name:
                n_blocks += reconstruct_block(ctx, name, by_name[name], inside[name],
                                              block_recs.pop(name).parts, self.result, generator)
            else:
                reconstruct_layer(ctx, points_by_name[name], layer_recs.pop(name).parts, self.result, generator)
        units = f"{n_blocks} blocks + {len(self.result.losses) - n_blocks} single layers"
        ctx.report.notes.append(self.result.note("brecq", units, skipped_sites(ctx, points)))
