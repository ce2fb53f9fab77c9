"""Point a Brain (or pretrained interface) at another set of modules for a while.

SpeechBrain code reaches its modules two ways: ``self.modules.x`` (the
``ModuleDict`` built from ``hparams["modules"]``) and ``self.hparams.x`` (the
very same objects, by reference). Quantization works on a copy of the
``ModuleDict``, so both views must be re-pointed to the copy, and back.
"""
import contextlib

import torch.nn as nn


def module_map(original, replacement):
    """``{id(original submodule): replacement submodule}`` for two structurally equal modules."""
    mapping = {}
    for (name, a), (_, b) in zip(original.named_modules(), replacement.named_modules()):
        mapping[id(a)] = b
    return mapping


@contextlib.contextmanager
def bound_modules(owner, modules, attr="modules"):
    """Within the block, ``owner.<attr>`` and every ``owner.hparams`` entry that
    referred to one of the original modules refer to ``modules`` instead.

    Arguments
    ---------
    owner : object
        A ``speechbrain.core.Brain`` (``attr="modules"``) or a pretrained
        interface (``attr="mods"``).
    modules : torch.nn.ModuleDict
        A copy of ``getattr(owner, attr)`` (e.g. its quantized copy).

    Example
    -------
    >>> import types, torch
    >>> mods = torch.nn.ModuleDict({"lin": torch.nn.Linear(2, 2)})
    >>> owner = types.SimpleNamespace(modules=mods, hparams=types.SimpleNamespace(lin=mods["lin"]))
    >>> copy = torch.nn.ModuleDict({"lin": torch.nn.Linear(2, 2)})
    >>> with bound_modules(owner, copy):
    ...     owner.hparams.lin is copy["lin"]
    True
    >>> owner.hparams.lin is mods["lin"]
    True
    """
    original = getattr(owner, attr)
    if modules is original:
        yield modules
        return
    mapping = module_map(original, modules)
    hparams = getattr(owner, "hparams", None)
    saved = {}
    store = vars(hparams) if hparams is not None and hasattr(hparams, "__dict__") else \
        hparams if isinstance(hparams, dict) else {}
    for key, value in list(store.items()):
        if isinstance(value, nn.Module) and id(value) in mapping:
            saved[key] = value
            store[key] = mapping[id(value)]
    setattr(owner, attr, modules)
    try:
        yield modules
    finally:
        setattr(owner, attr, original)
        store.update(saved)
