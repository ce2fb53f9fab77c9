"""Point a Brain (or pretrained interface) at another set of modules for a while.

SpeechBrain code reaches its modules two ways: ``self.modules.x`` (the
``ModuleDict`` built from ``hparams["modules"]``) and ``self.hparams.x`` (the
very same objects, by reference). Quantization works on a copy of the
``ModuleDict``, so both views must be re-pointed to the copy, and back.

The helpers are toolkit-neutral and live in :mod:`esc_plugin.binding`; they
are re-exported here so ``from esc_plugin.speechbrain.binding import ...``
keeps working.

Example
-------
>>> import types, torch
>>> mods = torch.nn.ModuleDict({"lin": torch.nn.Linear(2, 2)})
>>> brain = types.SimpleNamespace(modules=mods, hparams=types.SimpleNamespace(lin=mods["lin"]))
>>> copy = torch.nn.ModuleDict({"lin": torch.nn.Linear(2, 2)})
>>> with bound_modules(brain, copy):
...     brain.hparams.lin is copy["lin"], brain.modules is copy
(True, True)
"""
from ..binding import bound_modules, module_map

__all__ = ["bound_modules", "module_map"]
