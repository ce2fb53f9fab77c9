"""The SpeechBrain stage's output folder: write it, and rebuild the quantized modules from it.

A folder holds ``quantized.pt`` (the esc state: quantizer layout and scales,
read without running code from the file), a SpeechBrain ``Checkpointer``
checkpoint of the quantized modules, ``report.json`` and the plots.
"""
import hashlib
import os

from speechbrain.utils.checkpoints import Checkpointer

from ..core.errors import ConfigError


def save_quantized(qmodules, folder):
    """Write ``quantized.pt`` (esc state), a SpeechBrain checkpoint of the quantized modules,
    ``report.json`` and the plots into ``folder``."""
    from ..core.api import save as esc_save
    os.makedirs(folder, exist_ok=True)
    esc_save(qmodules, os.path.join(folder, "quantized.pt"))
    ckpt = Checkpointer(os.path.join(folder, "checkpoint"), recoverables=dict(qmodules.items()))
    ckpt.save_and_keep_only(meta={"esc_plugin": "quantized"}, num_to_keep=1)
    report = qmodules.esc_report
    report.save_json(os.path.join(folder, "report.json"))
    report.plot(folder)


def load_quantized(brain_or_modules, folder):
    """Rebuild the quantized modules saved by the stage onto a Brain built from the FP32 checkpoint.

    The quantizer layout comes from ``quantized.pt``; weights and scales are
    then restored through SpeechBrain's ``Checkpointer`` from
    ``folder/checkpoint``, so the result equals what the stage evaluated.

    Arguments
    ---------
    brain_or_modules : speechbrain.core.Brain or torch.nn.ModuleDict
    folder : str

    Returns
    -------
    torch.nn.ModuleDict
        The quantized copy; use ``with bound_modules(brain, qmodules):`` (or
        ``StageResult.applied``) to run the Brain with it.
    """
    from ..core.api import load as esc_load
    modules = getattr(brain_or_modules, "modules", brain_or_modules)
    state = os.path.join(folder, "quantized.pt")
    if not os.path.exists(state):
        raise ConfigError(f"{folder} holds no quantized.pt: point to a folder written by quantize_brain "
                          "(default <output_folder>/quantized/<method>_w<b>a<b>).")
    qmodules = esc_load(modules, state)
    ckpt_dir = os.path.join(folder, "checkpoint")
    if os.path.isdir(ckpt_dir):
        Checkpointer(ckpt_dir, recoverables=dict(qmodules.items())).recover_if_possible()
    return qmodules


def file_digest(path):
    """sha256 of a file (used by tests to show the FP32 checkpoint is unchanged)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
