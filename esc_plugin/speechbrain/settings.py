"""Read ``quantize:`` and ``quantization:`` from a recipe's hparams, before any work.

The ``quantization`` block holds :class:`~esc_plugin.QuantConfig` options plus
a few stage options (where to write, which metric to optimise). Everything is
checked here, so a typo fails before calibration starts. The valid
``quantize:`` values are read from the calibrator and preset registries when
the settings are read, so a calibrator registered by the user is accepted.

Example
-------
>>> from esc_plugin.speechbrain.settings import read_settings
>>> s = read_settings({"quantize": "esc", "quantization": {"bits": 4, "budget": 20},
...                    "output_folder": "results/run"})
>>> s.method, s.config.act_bits, s.output_folder
('esc', 4, 'results/run/quantized/esc_w4a4')
>>> read_settings({"quantize": "esc", "quantization": {"bits": 4, "init": "output_mse", "sigma0": 0.1},
...                "output_folder": "results/run"}).output_folder  # variants get their own folder
'results/run/quantized/esc_paper_w4a4'
>>> read_settings({"quantize": "esc_paper", "output_folder": "results/run"}).tag  # a preset name
'esc_paper_w8a8'
>>> read_settings({"quantize": "none"}) is None
True
>>> read_settings({"quantize": "int8"})
Traceback (most recent call last):
...
esc_plugin.core.errors.ConfigError: quantize: 'int8' is not a calibrator: use one of none, max, percentile, entropy, mse, esc, stablequant, output_mse, esc_paper, esc_initbest, nncf (e.g. `--quantize=esc`).
>>> read_settings({"quantize": "esc", "quantisation": {"bits": 4}})
Traceback (most recent call last):
...
esc_plugin.core.errors.ConfigError: hparams key 'quantisation' looks like a misspelt 'quantization' (the stage reads only 'quantization', so this block would be ignored): rename it to 'quantization'.
"""
import difflib
import os
from dataclasses import dataclass, fields
from typing import Optional

from ..core.config import QuantConfig
from ..core.errors import ConfigError

# Stage options that are not QuantConfig fields.
STAGE_OPTIONS = ("output_folder", "metric", "metric_key", "higher_is_better", "cache_front_end", "objective")
# objective: "metric" (the recipe's MetricStats, default) or "distill" (label-free: distance of the
# quantized modules' outputs to the FP32 ones on the calibration batches; the metric is still reported)
OBJECTIVES = ("metric", "distill")
KEYS = ("quantize", "quantization")
# Other projects' quantizers run as the stage for comparison (esc_plugin.speechbrain.peers): INT8 only,
# configured by their own defaults (of the quantization: block only bits: 8 and n_samples apply).
PEERS = ("nncf",)


def quantize_choices():
    """Values of ``quantize:``: ``none``, every registered calibrator, then the named presets."""
    from ..core.presets import preset_names
    return ("none",) + tuple(preset_names()) + PEERS


@dataclass
class StageSettings:
    """What the stage will do: calibrator, :class:`QuantConfig`, output folder, metric."""

    method: str
    config: QuantConfig
    output_folder: str
    metric: Optional[str] = None
    metric_key: Optional[str] = None
    higher_is_better: Optional[bool] = None
    tag: str = ""
    default_folder: Optional[str] = None
    cache_front_end: bool = True
    objective: str = "metric"
    peer: bool = False  # a peer quantizer (PEERS), not an esc_plugin calibrator


def check_key_spelling(hparams):
    """A top-level key close to ``quantize`` / ``quantization`` while the real key is
    absent is a typo whose block would be silently ignored: an error naming the key.

    Only values shaped like the stage's (a mapping or nothing for ``quantization``,
    a string or nothing for ``quantize``) count, so e.g. a wav2vec2 ``quantiser``
    module is not mistaken for one.
    """
    for key in KEYS:
        if key in hparams:
            continue
        for other in difflib.get_close_matches(key, [k for k in hparams if isinstance(k, str)], n=3,
                                               cutoff=0.8):
            if other in KEYS:
                continue
            value = hparams[other]
            shaped = (value is None or isinstance(value, dict)) if key == "quantization" else \
                (value is None or isinstance(value, (str, bool)))
            if shaped:
                raise ConfigError(f"hparams key {other!r} looks like a misspelt {key!r} (the stage reads "
                                  f"only {key!r}, so this block would be ignored): rename it to {key!r}.")


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
    from ..core.presets import label_of, preset_options
    from ..core.registry import get_calibrator

    check_key_spelling(hparams)
    method = hparams.get("quantize", "none")
    method = "none" if method in (None, False) else str(method).lower()
    if method == "none":
        # Before any registry read: the built-in calibrators import modelopt (slow), and a
        # recipe run without quantization should not pay for it.
        return None
    choices = quantize_choices()
    if method not in choices:
        raise ConfigError(f"quantize: {method!r} is not a calibrator: use one of {', '.join(choices)} "
                          "(e.g. `--quantize=esc`).")
    block = hparams.get("quantization") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"quantization: must be a mapping of options, got {type(block).__name__}.")
    block = dict(block)
    if method in PEERS:
        return _peer_settings(method, block, hparams)
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
    options = preset_options(method)  # a preset name brings its options; the block overrides them
    options.update(block)
    config = QuantConfig(**options)
    calibrator = config.method
    # Stage-only variants (not QuantConfig presets) get their own folder too, never overwriting plain runs.
    suffix = "".join(s for s, on in (
        ("_loss", stage.get("metric") == "loss" and get_calibrator(calibrator).objective != "none"),
        ("_distill", stage.get("objective") == "distill"),
        ("_attn", config.quantize_attention), ("_emb", config.quantize_embeddings)) if on)
    tag = f"{label_of(config)}{suffix}_w{config.weight_bits}a{config.act_bits}"
    folder, default = _output_folder(stage, hparams, tag)
    hib = stage.get("higher_is_better")
    if hib is not None and not isinstance(hib, bool):
        raise ConfigError(f"quantization: higher_is_better must be true or false, got {hib!r}.")
    cache = stage.get("cache_front_end", True)
    if not isinstance(cache, bool):
        raise ConfigError(f"quantization: cache_front_end must be true or false, got {cache!r}.")
    objective = stage.get("objective", "metric")
    if objective not in OBJECTIVES:
        raise ConfigError(f"quantization: objective={objective!r}; use 'metric' (the recipe's metric) or "
                          "'distill' (label-free: match the FP32 outputs).")
    if objective == "distill" and get_calibrator(calibrator).objective == "none":
        raise ConfigError(f"quantization: objective: distill has no effect with quantize: {method} "
                          "(it uses no objective): use quantize: esc.")
    return StageSettings(calibrator, config, str(folder), stage.get("metric"), stage.get("metric_key"), hib,
                         tag, default, cache, objective)


def _peer_settings(method, block, hparams):
    """A peer runs its own defaults: the recipe's QuantConfig options are checked as usual, and
    only ``bits`` (8) and ``n_samples`` (the calibration items) apply to it."""
    stage = {k: block.pop(k) for k in STAGE_OPTIONS if k in block}
    known = {f.name for f in fields(QuantConfig)} - {"method"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ConfigError(f"quantization: unknown option(s) {unknown}; valid options are "
                          f"{sorted(known | set(STAGE_OPTIONS))}.")
    config = QuantConfig(**{**block, "method": "max"})
    if config.weight_bits != 8 or config.act_bits != 8:
        raise ConfigError(f"quantize: {method} runs its INT8 default preset: set `quantization: {{bits: 8}}` "
                          "(W4A4 comparisons use esc_plugin's calibrators).")
    tag = f"{method}_w8a8"
    folder, default = _output_folder(stage, hparams, tag)
    return StageSettings(method, config, str(folder), stage.get("metric"), stage.get("metric_key"),
                         stage.get("higher_is_better"), tag, default, cache_front_end=False, peer=True)


def _output_folder(stage, hparams, tag):
    """``(folder, default)``: ``quantization.output_folder``, else ``<output_folder>/quantized/<tag>``."""
    default = (os.path.join(str(hparams["output_folder"]), "quantized", tag)
               if hparams.get("output_folder") else None)
    folder = stage.get("output_folder") or default
    if not folder:
        raise ConfigError("quantization: set output_folder (or the recipe's output_folder) "
                          "so the stage knows where to write the quantized model.")
    return folder, default
