"""Named configurations: one name for one thing in tables, folders and command lines.

A preset is a calibrator plus the options that make it a distinct variant
(``esc_initbest`` = ESC started from the best of its init and the baselines).
Every registered calibrator is also a preset of itself. Benchmarks, the CLI
and the SpeechBrain stage name their rows and folders with :func:`label_of`,
so a variant has the same name everywhere.

Example
-------
>>> from esc_plugin.core.presets import config_for, label_of, preset_names
>>> cfg = config_for("esc_initbest", bits=4)
>>> cfg.method, cfg.init, cfg.act_bits
('esc', 'best', 4)
>>> label_of(cfg)
'esc_initbest'
>>> "esc_initbest" in preset_names() and "max" in preset_names()
True
"""
from .errors import ConfigError

# name -> QuantConfig options (must include "method"); the more specific first (label_of takes
# the first match). esc_recommended: the search settings benchmarks/search_settings.py found to
# generalise best on the real models measured so far (see the README's quality results).
_PRESETS = {"esc_recommended": {"method": "esc", "init": "best", "sigma0": 0.3},
            "esc_initbest": {"method": "esc", "init": "best"}}
# options that make a variant, with the suffix they add to the method's name
_SUFFIXES = (("init", "best", "_initbest"),)


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
    """The row / folder name of a config: its preset's name, or method + variant suffixes."""
    for name, options in _PRESETS.items():
        if all(getattr(config, k) == v for k, v in options.items()):
            return name
    return config.method + "".join(s for key, value, s in _SUFFIXES
                                   if getattr(config, key) == value and config.method == "esc")
