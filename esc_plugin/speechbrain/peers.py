"""Peer quantizers as the recipe's stage: ``quantize: nncf`` (Intel NNCF) next to esc_plugin's.

So a recipe compares esc_plugin with Intel NNCF on its own data, loop and
metric, with nothing written by hand: ``--quantize=nncf`` runs
``nncf.quantize`` (INT8, default preset) on the same calibration batches,
then the same test evaluation as every other calibrator, into
``quantized/nncf_w8a8/metrics.json``.

A Brain spreads its model over ``modules`` and ``compute_forward``, which
may call a module once per utterance (ECAPA embeds the utterances of a trial
batch one by one). So the calls ``compute_forward`` makes into each module of
``brain.modules`` on the calibration batches are captured, and NNCF quantizes
each called module holding an op esc_plugin would quantize (Conv, Linear,
LayerNorm) on its own calls (:func:`esc_plugin.nncf_peer.nncf_quantize`); the
others (e.g. ``compute_features``: a filterbank matrix product on power
spectra) and whatever ``compute_forward`` does outside its modules stay
float, as esc_plugin leaves them: one INT8 scale cannot hold a power
spectrum, and a deployed model starts at its features. The result is a
quantized copy of ``brain.modules``, bound and evaluated like a calibrator's.
NNCF needs ``pip install -e ".[peers]"``; its model is not saved in
esc_plugin's format (only the metrics).
"""
import os
import time

import torch

from ..core.errors import ConfigError
from ..core.io import write_json
from ..core.modules import wrappable
from ..nncf_peer import import_nncf, nncf_quantize
from .metric import fp32_lacks_test_metrics


def _holds_quantizable_op(_name, module):
    return any(wrappable(m) for m in module.modules())


def nncf_quantize_brain(modules, forward_loop):
    """``nncf.quantize`` of each module of a copy of ``modules`` that ``forward_loop(modules)`` calls.

    Returns ``(quantized copy of modules, note)``; the note says what differed from NNCF's defaults
    (or None).
    """
    try:
        nncf = import_nncf()
    except ImportError as exc:
        raise ConfigError("quantize: nncf needs Intel NNCF: pip install -e '.[peers]' (nncf==3.4.0).") from exc
    with torch.no_grad():
        try:
            return nncf_quantize(modules, forward_loop, select=_holds_quantizable_op), None
        except nncf.errors.InternalError as exc:
            # NNCF's fast bias correction cannot read a bias that is not a graph constant (e.g. the
            # in-projection bias slices inside nn.MultiheadAttention): rerun without that one step.
            advanced = nncf.AdvancedQuantizationParameters(disable_bias_correction=True)
            note = (f"NNCF's default pipeline failed ({exc}); rerun with its bias correction disabled "
                    "(AdvancedQuantizationParameters(disable_bias_correction=True)), otherwise default")
            return nncf_quantize(modules, forward_loop, select=_holds_quantizable_op,
                                 advanced_parameters=advanced), note


def run_peer_stage(brain, settings, batches, forward_loop, objective, fp32_objective, evaluate, fp32_metrics,
                   test_set, notes):
    """The stage for a peer quantizer: quantize, score the calibration objective, evaluate, write metrics.

    ``forward_loop(modules)``, ``objective(modules)`` and ``evaluate(modules, folder)`` are the stage's
    own functions, the same the calibrators run.
    """
    folder = settings.output_folder
    t = time.perf_counter()
    qmodules, fallback_note = nncf_quantize_brain(brain.modules, forward_loop)
    seconds = time.perf_counter() - t
    notes = list(notes) + [f"nncf.quantize (INT8, default preset) of each module compute_forward calls that holds a "
                           f"Conv/Linear/LayerNorm, on its calls over the {len(batches)} calibration batches; the "
                           "other modules and the ops outside brain.modules left in float"]
    notes += [fallback_note] if fallback_note else []
    metrics = {"method": "nncf", "label": settings.tag, "bits": "W8A8", "notes": notes,
               "calibration_objective": {"fp32": fp32_objective, "quantized": objective(qmodules)},
               "fp32": fp32_metrics, "quantized": None, "seconds": seconds}
    if test_set is not None:
        metrics["quantized"] = evaluate(qmodules, folder)
        if fp32_lacks_test_metrics(metrics):
            metrics["fp32"] = evaluate(brain.modules, os.path.join(folder, "fp32_test"))
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "metrics.json"), metrics)
    return qmodules, metrics
