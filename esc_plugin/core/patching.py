"""Scoped, per-thread replacement of torch functions while quantized modules run.

Some quantized ops cannot be reached by swapping modules: ``nn.MultiheadAttention``
and SpeechBrain's ``RelPosMHAXL`` call ``F.linear`` on raw parameters, attention
modules call ``F.scaled_dot_product_attention``, and torch's fused MHA /
transformer kernels are chosen by ``torch.backends.mha.get_fastpath_enabled()``.
All three are looked up as module attributes at call time, so esc_plugin
replaces the attribute, but only:

* **while a quantized module runs**: a :class:`ScopedPatch` counts the scopes
  open in all threads (under a lock) and puts the original back as soon as the
  last one closes, also when the forward raises;
* **for the thread that runs it**: the replacement looks at this thread's own
  state (:func:`thread_stack`) and, in any other thread, calls the original
  with the same arguments, so an FP32 model running next to a quantized one
  computes bit for bit what it computes alone.

The MHA fast-path switch is handled the same way: the getter is replaced
(``False`` in a thread inside a quantized module, the user's setting
everywhere else) and the user's flag itself is never written, so nothing can
restore a stale value under another thread's feet.

Example
-------
>>> import torch
>>> with mha_fastpath_off():
...     torch.backends.mha.get_fastpath_enabled()
False
>>> torch.backends.mha.get_fastpath_enabled is ORIG_GET_FASTPATH
True
"""
import contextlib
import threading

import torch

_LOCAL = threading.local()  # this thread's routing state (see thread_stack)

ORIG_GET_FASTPATH = torch.backends.mha.get_fastpath_enabled


def thread_stack(name):
    """This thread's list ``name`` (created empty): the quantized modules it is inside."""
    stack = getattr(_LOCAL, name, None)
    if stack is None:
        stack = []
        setattr(_LOCAL, name, stack)
    return stack


class ScopedPatch:
    """``owner.<name>`` replaced by ``replacement`` while any thread holds the patch.

    Arguments
    ---------
    owner : module or object
        Where the attribute lives (e.g. ``torch.nn.functional``).
    name : str
        The attribute.
    replacement : callable
        Installed by the first :meth:`acquire`; it sees the calls of every
        thread while installed, so it must route on per-thread state.

    Example
    -------
    >>> import math
    >>> patch = ScopedPatch(math, "sqrt", lambda x: -1.0)
    >>> with patch.held():
    ...     math.sqrt(4.0)
    -1.0
    >>> math.sqrt(4.0), patch.holders
    (2.0, 0)
    """

    def __init__(self, owner, name, replacement):
        self.owner, self.name, self.replacement = owner, name, replacement
        self.holders = 0  # scopes open in all threads
        self._saved = None
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self.holders == 0:
                self._saved = getattr(self.owner, self.name)
                setattr(self.owner, self.name, self.replacement)
            self.holders += 1

    def release(self):
        with self._lock:
            if self.holders <= 0:
                raise RuntimeError(f"{self.name}: released more often than acquired (an esc_plugin bug)")
            self.holders -= 1
            if self.holders == 0:
                setattr(self.owner, self.name, self._saved)
                self._saved = None

    @contextlib.contextmanager
    def held(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


def _get_fastpath_enabled():
    # Inside a quantized module of this thread the fused kernels would skip the quantizers.
    if getattr(_LOCAL, "unfused", 0):
        return False
    return ORIG_GET_FASTPATH()


_FASTPATH = ScopedPatch(torch.backends.mha, "get_fastpath_enabled", _get_fastpath_enabled)


@contextlib.contextmanager
def mha_fastpath_off():
    """torch's fused MHA / transformer fast path off in this thread, for this scope.

    The fused kernels never call ``F.linear`` or the layers' Linear / LayerNorm
    modules, so their quantizers would be silently skipped. Other threads keep
    the user's ``torch.backends.mha.set_fastpath_enabled`` setting.
    """
    _LOCAL.unfused = getattr(_LOCAL, "unfused", 0) + 1
    _FASTPATH.acquire()
    try:
        yield
    finally:
        _LOCAL.unfused -= 1
        _FASTPATH.release()
