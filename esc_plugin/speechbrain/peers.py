"""Peer quantizers as the recipe's stage: ``quantize: nncf`` (Intel NNCF) next to esc_plugin's.

So a recipe compares esc_plugin with Intel NNCF on its own data, loop and
metric, with nothing written by hand: ``--quantize=nncf`` runs
``nncf.quantize`` (INT8, default preset) on the same calibration batches,
then the same test evaluation as every other calibrator, into
``quantized/nncf_w8a8/metrics.json``.

NNCF quantizes one ``torch.nn.Module`` called with the dataset's items, while
a Brain spreads its model over ``modules`` and ``compute_forward``. So a copy
of ``brain.modules`` is wrapped in a module whose ``forward(batch)`` is the
recipe's own ``compute_forward`` with the copy bound; NNCF traces and
quantizes that, and during evaluation the Brain's ``compute_forward`` is
routed through the quantized wrapper. What ``compute_forward`` does outside
``brain.modules`` (e.g. ``hparams.compute_features``: a filterbank matrix
product on power spectra) is traced too but left in float, through NNCF's
``IgnoredScope`` on ops outside any module, as esc_plugin leaves it: one
INT8 scale cannot hold a power spectrum, and a deployed model starts at its
features. NNCF needs ``pip install -e ".[peers]"``; its model is not saved
in esc_plugin's format (only the metrics).
"""
import contextlib
import copy
import os
import time

import torch
import speechbrain as sb

from ..core.errors import ConfigError
from ..core.io import write_json
from .binding import bound_modules
from .metric import fp32_lacks_test_metrics

TEST = sb.Stage.TEST
# NNCF node names are "<module path>/<op>/<index>"; ops called outside any module have an empty path
OUTSIDE_MODULES = r"/[^/]+/\d+"


class BrainForward(torch.nn.Module):
    """``forward(batch)`` = the Brain's ``compute_forward(batch, TEST)`` with ``inner`` bound as its modules."""

    def __init__(self, brain, inner):
        super().__init__()
        self.inner = inner
        # a plain attribute, not a submodule: NNCF must neither copy nor trace into the Brain itself
        object.__setattr__(self, "_brain", brain)
        object.__setattr__(self, "_compute_forward", type(brain).compute_forward)

    def __deepcopy__(self, memo):
        # NNCF copies the model it quantizes: copy the modules, share the Brain (its loaders,
        # loggers and checkpointer are not copyable, and must stay the recipe's own)
        memo[id(self._brain)] = self._brain
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

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


def nncf_quantize_brain(brain, batches):
    """``nncf.quantize`` of a copy of ``brain.modules`` driven by ``compute_forward`` on ``batches``.

    Returns ``(quantized model, note)``; the note says what differed from NNCF's defaults (or None).
    """
    try:
        import nncf
    except ImportError as exc:
        raise ConfigError("quantize: nncf needs Intel NNCF: pip install -e '.[peers]' (nncf==3.4.0).") from exc
    dataset = nncf.Dataset(batches)
    options = {"subset_size": len(batches), "ignored_scope": nncf.IgnoredScope(patterns=[OUTSIDE_MODULES],
                                                                                validate=False)}
    with torch.no_grad():
        # NNCF counts dataset items (here: batches): use every calibration batch
        try:
            wrapper = BrainForward(brain, copy.deepcopy(brain.modules)).eval()
            return nncf.quantize(wrapper, dataset, **options), None
        except nncf.errors.InternalError as exc:
            # NNCF's fast bias correction cannot read a bias that is not a graph constant (e.g. the
            # in-projection bias slices inside nn.MultiheadAttention): rerun without that one step.
            wrapper = BrainForward(brain, copy.deepcopy(brain.modules)).eval()
            advanced = nncf.AdvancedQuantizationParameters(disable_bias_correction=True)
            note = (f"NNCF's default pipeline failed ({exc}); rerun with its bias correction disabled "
                    "(AdvancedQuantizationParameters(disable_bias_correction=True)), otherwise default")
            return nncf.quantize(wrapper, dataset, **options, advanced_parameters=advanced), note


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
    notes = list(notes) + [f"nncf.quantize (INT8, default preset) on the {len(batches)} calibration batches, "
                           "traced through compute_forward; ops outside brain.modules left in float (IgnoredScope)"]
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
