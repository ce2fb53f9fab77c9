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
spectrum, and a deployed model starts at its features. During evaluation the
Brain's ``compute_forward`` runs with the quantized copy of the modules bound.
NNCF needs ``pip install -e ".[peers]"``; its model is not saved in
esc_plugin's format (only the metrics).
"""
import contextlib
import os
import time

import torch
import speechbrain as sb

from ..core.errors import ConfigError
from ..core.io import write_json
from ..core.modules import wrappable
from ..nncf_peer import import_nncf, nncf_quantize
from .binding import bound_modules
from .metric import fp32_lacks_test_metrics

TEST = sb.Stage.TEST


class BrainForward(torch.nn.Module):
    """``forward(batch)`` = the Brain's ``compute_forward(batch, TEST)`` with ``inner`` bound as its modules."""

    def __init__(self, brain, inner):
        super().__init__()
        self.inner = inner
        # a plain attribute, not a submodule: the Brain's loaders, loggers and checkpointer stay its own
        object.__setattr__(self, "_brain", brain)
        object.__setattr__(self, "_compute_forward", type(brain).compute_forward)

    def forward(self, batch):
        with bound_modules(self._brain, self.inner):
            return self._compute_forward(self._brain, batch, TEST)


@contextlib.contextmanager
def routed_forward(brain, model):
    """Within the block ``brain.compute_forward(batch, stage)`` runs ``model(batch)``."""
    missing = object()
    own = brain.__dict__.get("compute_forward", missing)
    brain.compute_forward = lambda batch, stage: model(batch)
    try:
        yield
    finally:
        if own is missing:
            del brain.compute_forward  # the class's method again
        else:
            brain.compute_forward = own


def _holds_quantizable_op(_name, module):
    return any(wrappable(m) for m in module.modules())


def nncf_quantize_brain(brain, batches):
    """``nncf.quantize`` of each module of a copy of ``brain.modules`` that ``compute_forward`` calls.

    Returns ``(BrainForward over the quantized modules, note)``; the note says what differed from
    NNCF's defaults (or None).
    """
    try:
        nncf = import_nncf()
    except ImportError as exc:
        raise ConfigError("quantize: nncf needs Intel NNCF: pip install -e '.[peers]' (nncf==3.4.0).") from exc

    def loop(modules):
        with bound_modules(brain, modules):
            for batch in batches:
                type(brain).compute_forward(brain, batch, TEST)

    with torch.no_grad():
        try:
            return BrainForward(brain, nncf_quantize(brain.modules, loop, select=_holds_quantizable_op)), None
        except nncf.errors.InternalError as exc:
            # NNCF's fast bias correction cannot read a bias that is not a graph constant (e.g. the
            # in-projection bias slices inside nn.MultiheadAttention): rerun without that one step.
            advanced = nncf.AdvancedQuantizationParameters(disable_bias_correction=True)
            note = (f"NNCF's default pipeline failed ({exc}); rerun with its bias correction disabled "
                    "(AdvancedQuantizationParameters(disable_bias_correction=True)), otherwise default")
            return BrainForward(brain, nncf_quantize(brain.modules, loop, select=_holds_quantizable_op,
                                                     advanced_parameters=advanced)), note


def run_peer_stage(brain, settings, batches, objective, fp32_objective, evaluate, fp32_metrics, test_set,
                   notes):
    """The stage for a peer quantizer: quantize, score the calibration objective, evaluate, write metrics.

    ``objective(modules)`` and ``evaluate(modules, folder)`` are the stage's own functions, run here
    with ``brain.modules`` while ``compute_forward`` is routed through the quantized model.
    """
    folder = settings.output_folder
    t = time.perf_counter()
    qmodel, fallback_note = nncf_quantize_brain(brain, batches)
    seconds = time.perf_counter() - t
    notes = list(notes) + [f"nncf.quantize (INT8, default preset) of each module compute_forward calls that holds a "
                           f"Conv/Linear/LayerNorm, on its calls over the {len(batches)} calibration batches; the "
                           "other modules and the ops outside brain.modules left in float"]
    notes += [fallback_note] if fallback_note else []
    with routed_forward(brain, qmodel):
        quantized_objective = objective(brain.modules)
        metrics = {"method": "nncf", "label": settings.tag, "bits": "W8A8", "notes": notes,
                   "calibration_objective": {"fp32": fp32_objective, "quantized": quantized_objective},
                   "fp32": fp32_metrics, "quantized": None, "seconds": seconds}
        if test_set is not None:
            metrics["quantized"] = evaluate(brain.modules, folder)
    if test_set is not None and fp32_lacks_test_metrics(metrics):
        metrics["fp32"] = evaluate(brain.modules, os.path.join(folder, "fp32_test"))
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "metrics.json"), metrics)
    return qmodel, metrics
