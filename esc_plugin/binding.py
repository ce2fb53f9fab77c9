"""Copy / rebind helpers shared by the toolkit integrations (SpeechBrain, NeMo).

Quantization works on a deep copy of a model. Toolkits reach their modules
through more than one reference (SpeechBrain: ``brain.modules.x`` and
``brain.hparams.x``; NeMo: instance ``forward`` wrappers bound to the
original), and hold state that must not, or cannot, be copied (trainers,
dataloaders, instrumentation proxies). These helpers handle that with plain
``torch.nn`` objects; this module imports no toolkit.
"""
import contextlib
import types

import torch
import torch.nn as nn


def module_map(original, replacement):
    """``{id(original submodule): replacement submodule}`` for two structurally equal modules.

    Example
    -------
    >>> a = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> b = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> module_map(a, b)[id(a[0])] is b[0]
    True
    """
    mapping = {}
    for (_, a), (_, b) in zip(original.named_modules(), replacement.named_modules()):
        mapping[id(a)] = b
    return mapping


def _attribute_store(hparams):
    """The mutable mapping behind an hparams object (a namespace or a dict)."""
    if hparams is None:
        return {}
    if isinstance(hparams, dict):
        return hparams
    return vars(hparams) if hasattr(hparams, "__dict__") else {}


@contextlib.contextmanager
def bound_modules(owner, modules, attr="modules"):
    """Within the block, ``owner.<attr>`` and every ``owner.hparams`` entry that
    referred to one of the original modules refer to ``modules`` instead.

    Arguments
    ---------
    owner : object
        Anything with the modules in ``owner.<attr>`` and optionally an
        ``owner.hparams`` namespace or dict holding references to them (a
        SpeechBrain ``Brain`` with ``attr="modules"``, a pretrained interface
        with ``attr="mods"``).
    modules : torch.nn.Module
        A structural copy of ``getattr(owner, attr)`` (e.g. its quantized copy).
    attr : str
        Name of the attribute holding the modules.

    Example
    -------
    >>> import types
    >>> mods = nn.ModuleDict({"lin": nn.Linear(2, 2)})
    >>> owner = types.SimpleNamespace(modules=mods, hparams=types.SimpleNamespace(lin=mods["lin"]))
    >>> copy = nn.ModuleDict({"lin": nn.Linear(2, 2)})
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
    store = _attribute_store(getattr(owner, "hparams", None))
    saved = {}
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


@contextlib.contextmanager
def evaluation_mode(module):
    """``module.eval()`` inside the block; every submodule's previous mode is restored after.

    Example
    -------
    >>> net = nn.Sequential(nn.Dropout(), nn.Linear(2, 2))
    >>> net[0].train(False)
    Dropout(p=0.5, inplace=False)
    >>> with evaluation_mode(net):
    ...     net.training
    False
    >>> net.training, net[0].training
    (True, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def is_instrumentation(obj, name, value):
    """True for an instance attribute that wraps one of the class's own methods
    (e.g. a ``wrapt`` proxy installed by telemetry): such wrappers point at the
    original object and often refuse ``copy.deepcopy``."""
    try:
        import wrapt
        proxy = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)  # wrapt 2 / wrapt 1
        if isinstance(value, proxy):
            return True
    except ImportError:
        pass
    return callable(value) and callable(getattr(type(obj), name, None))


@contextlib.contextmanager
def detached_attributes(obj, names=(), instrumentation=True):
    """Set ``obj``'s instance attributes ``names`` to ``None`` (and, with
    ``instrumentation``, remove public method wrappers, see
    :func:`is_instrumentation`) while the block runs, e.g. around a deep copy;
    everything is put back on exit.

    Example
    -------
    >>> import copy
    >>> class Model(nn.Linear):
    ...     pass
    >>> m = Model(2, 2)
    >>> m.__dict__["_trainer"] = object()
    >>> with detached_attributes(m, ["_trainer"]):
    ...     c = copy.deepcopy(m)
    >>> c.__dict__["_trainer"] is None, m.__dict__["_trainer"] is not None
    (True, True)
    """
    state = obj.__dict__
    saved = {n: state[n] for n in names if state.get(n) is not None}
    if instrumentation:
        saved.update({k: v for k, v in state.items()
                      if k not in saved and not k.startswith("_") and is_instrumentation(obj, k, v)})
    for n in saved:
        if n in names:
            state[n] = None
        else:
            del state[n]
    try:
        yield obj
    finally:
        state.update(saved)


def rebind_copied_forwards(model):
    """Point decorated instance ``forward`` attributes of a deep copy back at the copy.

    Some modules set ``self.forward = torch.no_grad()(self.forward)`` in
    ``__init__`` (NeMo's ``FilterbankFeatures``): an instance attribute
    wrapping a bound method. ``copy.deepcopy`` copies the wrapper function by
    reference, so the copy would keep running the *original* module (its
    mode included). Each such wrapper (``__wrapped__`` bound to another
    object) is rebuilt around the copy's own method. Returns the number rebound.

    Example
    -------
    >>> import copy
    >>> class Front(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gain = 1.0
    ...         self.forward = torch.no_grad()(self.forward)
    ...     def forward(self, x):
    ...         return x * self.gain
    >>> a = Front()
    >>> b = copy.deepcopy(a)
    >>> b.gain = 2.0
    >>> float(b(torch.ones(1)))   # still runs ``a``
    1.0
    >>> rebind_copied_forwards(b), float(b(torch.ones(1)))
    (1, 2.0)
    """
    n = 0
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        wrapped = getattr(fwd, "__wrapped__", None)
        if isinstance(wrapped, types.MethodType) and wrapped.__self__ is not m:
            m.__dict__["forward"] = torch.no_grad()(types.MethodType(wrapped.__func__, m))
            n += 1
    return n


__all__ = ["module_map", "bound_modules", "evaluation_mode", "is_instrumentation", "detached_attributes",
           "rebind_copied_forwards"]
