"""Named configurations: one name for one thing in tables, folders and command lines.

A preset is a calibrator plus the options that make it a distinct variant
(``esc_paper`` = ESC with the paper's search settings: CMA-ES from the
output-MSE init with σ0 = 0.1; plain ``esc`` uses the project's defaults).
Every registered calibrator is also a preset of itself. Benchmarks, the CLI
and the SpeechBrain stage name their rows and folders with :func:`label_of`,
so a variant has the same name everywhere.

Example
-------
>>> from esc_plugin.core.presets import config_for, label_of, preset_names
>>> cfg = config_for("esc_paper", bits=4)
>>> cfg.method, cfg.init, cfg.sigma0, cfg.act_bits
('esc', 'output_mse', 0.1, 4)
>>> label_of(cfg), label_of(config_for("esc"))
('esc_paper', 'esc')
>>> "esc_paper" in preset_names() and "max" in preset_names()
True

"""
from .errors import ConfigError

# name -> QuantConfig options (must include "method"); the more specific first (label_of takes
# the first match). esc_paper: the paper's search settings (QuantConfig's ESC defaults are the ones
# benchmarks/search_settings.py found to generalise best on the real models); esc_initbest: the
# paper's σ0 from the best start, a variant of earlier tables.
_PRESETS = {"esc_paper": {"method": "esc", "init": "output_mse", "sigma0": 0.1},
            "esc_initbest": {"method": "esc", "init": "best", "sigma0": 0.1}}


def register_preset(name, **options):
    """Name a calibrator + options combination (``options`` must include ``method``)."""
    if "method" not in options:
        raise ConfigError(f"preset {name!r} needs a method (a registered calibrator name).")
    _PRESETS[name] = dict(options)


def preset_names():
    """Registered calibrators, then the named variants."""
    from .registry import calibrator_names

    return calibrator_names() + tuple(n for n in _PRESETS if n not in calibrator_names())


def preset_options(name):
    """The QuantConfig options of a preset (a calibrator name gives ``{"method": name}``)."""
    from .registry import calibrator_names

    if name in _PRESETS:
        return dict(_PRESETS[name])
    if name in calibrator_names():
        return {"method": name}
    raise ConfigError(f"{name!r} is neither a calibrator nor a preset: choose one of {', '.join(preset_names())}.")


def config_for(name, **overrides):
    """A :class:`QuantConfig` for a preset name, with ``overrides`` applied on top."""
    from .config import QuantConfig

    options = preset_options(name)
    options.update(overrides)
    return QuantConfig(**options)


def label_of(config):
    """The row / folder name of a config: its preset's name, or its method's."""
    for name, options in _PRESETS.items():
        if all(getattr(config, k) == v for k, v in options.items()):
            return name
    return config.method
