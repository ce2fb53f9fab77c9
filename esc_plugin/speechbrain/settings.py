"""Read ``quantize:`` and ``quantization:`` from a recipe's hparams, before any work.

The ``quantization`` block holds :class:`~esc_plugin.QuantConfig` options plus
a few stage options (where to write, which metric to optimise). Everything is
checked here, so a typo fails before calibration starts.

Example
-------
>>> from esc_plugin.speechbrain.settings import read_settings
>>> s = read_settings({"quantize": "esc", "quantization": {"bits": 4, "budget": 20},
...                    "output_folder": "results/run"})
>>> s.method, s.config.act_bits, s.output_folder
('esc', 4, 'results/run/quantized/esc_w4a4')
>>> read_settings({"quantize": "esc", "quantization": {"bits": 4, "init": "best"},
...                "output_folder": "results/run"}).output_folder  # variants get their own folder
'results/run/quantized/esc_initbest_w4a4'
>>> read_settings({"quantize": "none"}) is None
True
>>> read_settings({"quantize": "int8"})
Traceback (most recent call last):
...
esc_plugin.core.errors.ConfigError: quantize: 'int8' is not a calibrator: use one of none, max, percentile, entropy, mse, esc (e.g. `--quantize=esc`).
"""
import os
from dataclasses import dataclass, fields
from typing import Optional

from ..core.config import METHODS, QuantConfig
from ..core.errors import ConfigError

CHOICES = ("none",) + METHODS
# Stage options that are not QuantConfig fields.
STAGE_OPTIONS = ("output_folder", "metric", "metric_key", "higher_is_better")


@dataclass
class StageSettings:
    """What the stage will do: calibrator, :class:`QuantConfig`, output folder, metric."""

    method: str
    config: QuantConfig
    output_folder: str
    metric: Optional[str] = None
    metric_key: Optional[str] = None
    higher_is_better: Optional[bool] = None


def read_settings(hparams):
    """Validate the stage's hparams; ``None`` when ``quantize`` is ``none`` or absent.

    Arguments
    ---------
    hparams : dict
        The recipe's loaded hyperparameters (``quantize``, ``quantization``,
        ``output_folder``).

    Returns
    -------
    StageSettings or None
    """
    method = hparams.get("quantize", "none")
    method = "none" if method in (None, False) else str(method).lower()
    if method not in CHOICES:
        raise ConfigError(f"quantize: {method!r} is not a calibrator: use one of {', '.join(CHOICES)} "
                          "(e.g. `--quantize=esc`).")
    if method == "none":
        return None
    block = hparams.get("quantization") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"quantization: must be a mapping of options, got {type(block).__name__}.")
    block = dict(block)
    stage = {k: block.pop(k) for k in STAGE_OPTIONS if k in block}
    known = sorted({f.name for f in fields(QuantConfig)} - {"method"} | set(STAGE_OPTIONS))
    unknown = sorted(set(block) - set(known))
    if "method" in block:
        raise ConfigError("quantization: method is set by the top-level `quantize:` key "
                          "(e.g. `quantize: esc` or `--quantize=esc`), not inside `quantization:`.")
    if unknown:
        raise ConfigError(f"quantization: unknown option(s) {unknown}; valid options are {known}.")
    if isinstance(block.get("exclude"), str):
        block["exclude"] = [block["exclude"]]
    config = QuantConfig(method=method, **block)
    folder = stage.get("output_folder")
    if not folder:
        if not hparams.get("output_folder"):
            raise ConfigError("quantization: set output_folder (or the recipe's output_folder) "
                              "so the stage knows where to write the quantized model.")
        # variants never overwrite the plain runs
        variant = "".join(suffix for suffix, on in (
            ("_initbest", method == "esc" and config.init == "best"),
            ("_loss", stage.get("metric") == "loss" and method in ("esc", "percentile")),
            ("_attn", config.quantize_attention), ("_emb", config.quantize_embeddings)) if on)
        tag = f"{method}{variant}_w{config.weight_bits}a{config.act_bits}"
        folder = os.path.join(str(hparams["output_folder"]), "quantized", tag)
    hib = stage.get("higher_is_better")
    if hib is not None and not isinstance(hib, bool):
        raise ConfigError(f"quantization: higher_is_better must be true or false, got {hib!r}.")
    return StageSettings(method, config, str(folder), stage.get("metric"), stage.get("metric_key"), hib)
