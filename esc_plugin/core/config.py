"""Quantization configuration (a plain dataclass, like torchao's config objects).

Every field is checked when the config is built, so a typo or a wrong type
fails before any work, with the valid values in the message. ``method`` and
``ptq`` are checked against the registries (:mod:`esc_plugin.core.registry`).

Example
-------
>>> from esc_plugin.core.config import QuantConfig
>>> cfg = QuantConfig(bits=4, method="esc", budget=50)
>>> cfg.weight_bits, cfg.act_bits
(4, 4)
>>> QuantConfig(bits=3)
Traceback (most recent call last):
...
esc_plugin.core.errors.ConfigError: bits=3 is not supported: use 8 (W8A8) or 4 (W4A4), or set weight_bits / act_bits to 4 or 8 each.
>>> QuantConfig(exclude="head").exclude
('head',)
>>> QuantConfig(budjet=10)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
esc_plugin.core.errors.ConfigError: unknown quantization option(s) ['budjet'] (did you mean 'budget'?): valid options are act_bits, ...
"""
import difflib
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple, Union

from .errors import ConfigError

SUPPORTED_BITS = (4, 8)
NAN_POLICIES = ("error", "ignore")


@dataclass
class QuantConfig:
    """What to quantize and how to calibrate it.

    Arguments
    ---------
    bits : int
        Bit width for weights and activations (8 = W8A8, 4 = W4A4).
    method : str
        Activation calibrator, by registered name: ``max``, ``percentile``,
        ``entropy``, ``mse``, ``esc`` or one registered with
        :func:`esc_plugin.core.registry.register_calibrator`.
    weight_bits, act_bits : int, optional
        Override ``bits`` for weights / activations independently (e.g. W4A8).
    budget : int
        ESC: number of CMA-ES objective evaluations (Γ in the paper).
    sigma0 : float
        ESC: initial CMA-ES step size, relative: see ``search_space``. The
        default 0.3 (the paper: 0.1) lets the search leave a start that is
        already a good baseline; ``config_for("esc_paper")`` gives the paper's.
    search_space : str
        ESC: ``"log"`` (default) searches log-multipliers of the local init
        (σ0 ≈ ±10 %); ``"range"`` searches each scale as a fraction of its
        layer's observed max (σ0 = a tenth of the range): it lowers the
        calibration objective further but over-fits small calibration sets
        more. See :mod:`esc_plugin.core.search`.
    popsize : int, optional
        ESC: CMA-ES population size; default is cma's ``4 + 3 ln(N)``.
    restarts : int
        ESC: number of IPOP restarts within the same budget Γ (0: one run, as
        in the paper). Run ``r`` doubles the population, starts from the best
        sample so far with σ0, and gets a share of Γ proportional to its
        population. See :mod:`esc_plugin.core.search`.
    n_samples : int
        Number of calibration samples the integrations draw (the core never
        loads data itself: the caller's ``forward_loop`` does).
    seed : int
        Seed for CMA-ES and any sub-sampling; a run is deterministic given it.
    percentiles : tuple of float
        Candidates of the ``percentile`` calibrator; the best on the objective is kept.
    histogram_bins : int
        Bins of the |x| histogram used by percentile / entropy / mse.
    init_grid : int
        ESC: number of candidate scales per layer in the local grid search.
    init_max_elements : int
        ESC: cap on cached input elements per layer for the local search
        (and the input samples of SmoothQuant ``"auto"``, HyQ, NoisyQuant).
        The sample is drawn with ``seed``; too small a sample makes the init,
        and the start the search takes, move with the seed. Memory: up to
        4 bytes per element per quantized op; lower it for very large models.
    exclude : tuple of str
        ``fnmatch`` patterns of module names to leave in float (reported as such).
    quantize_layernorm : bool
        Quantize LayerNorm inputs, as the paper does.
    quantize_attention : bool
        Also quantize the attention products ``Q K^T`` and ``P V`` of modules
        that call ``F.scaled_dot_product_attention`` (Q, K, V calibrated like
        every activation, softmax probabilities with the fixed amax 1). Off by
        default: outside the paper's op set, but needed for INT8 attention in a
        deployed graph. See :mod:`esc_plugin.core.attention`.
    quantize_embeddings : bool
        Store ``nn.Embedding`` tables per row in ``weight_bits`` (weight-only:
        a lookup has no activation to quantize). Off by default (outside the
        paper's op set); shrinks deployed files with large tables.
    init : str
        ESC: ``"best"`` (default) evaluates the per-layer output-MSE grid
        search (paper Eq. 4) and the max / percentile / entropy / mse scales
        on the objective and starts CMA-ES from whichever scores best (costs
        a histogram pass and a few extra evaluations); ``"output_mse"``
        starts from Eq. 4 alone, as the paper does. The defaults ``init`` and
        ``sigma0`` are the settings the project's benchmarks found to
        generalise best across its real models (README, "Quality"): at W4A4
        they decide whether ESC beats the baselines at all.
    keep_init_if_worse : bool
        ESC: if the mean of the final search distribution scores worse on the
        objective than the local init, keep the init (recorded in the report).
    checkpoint : str, optional
        ESC: file holding the CMA-ES state, written every generation; an
        interrupted run restarted with the same file resumes where it stopped.
    ptq : tuple of str
        PTQ passes composed with the calibrator, by registered name (see
        :func:`esc_plugin.core.registry.transform_names`). Passes of the
        ``before_calibration`` stage run first, in the order given, then the
        calibrator, then the ``after_calibration`` passes.
    distill : str
        The label-free objective (:mod:`esc_plugin.core.distill`): distance
        of the quantized outputs to the FP32 model's on the forward loop.
        ``"auto"`` (KL for a classification/vocabulary head, MSE otherwise),
        ``"kl"`` or ``"mse"``. ESC uses it when no objective is given.
    distill_weight : float
        With an objective given, ESC minimises ``objective + distill_weight *
        distillation`` (0, the default, leaves the objective alone).
    selection_split : float or None
        Selection guard: the fraction of calibration calls held back from the
        search; the final scales are chosen among the search mean, the best
        sample and the start point on that held-back part (with
        ``init="best"``, also among the other start candidates). Applies to the
        distillation objective and to objectives with a ``split(fraction)``
        method; ``None`` turns it off.
    distance_gate : float or None
        ESC with ``init="best"`` and a given objective: a start candidate
        whose label-free distance to the FP32 outputs (the distillation
        distance on every calibration sample) exceeds ``distance_gate`` times
        the closest candidate's is not the start, and a final candidate (the
        search mean, the best sample, the start and the other start
        candidates) beyond it is not kept, whatever its objective: on a few calibration samples
        a coarse task metric (an EER over 100 trials, a WER over 9 clips)
        rewards such scales by chance more often than for a real gain. The
        forward loop must repeat the same batches in the same order (as for
        the distillation objective). ``None`` judges the candidates on the
        objective alone.
    fallback_layers : int
        Accuracy fallback: leave this many of the most sensitive quantized
        ops in float (see :mod:`esc_plugin.core.transforms.fallback`).
    max_drop : float, optional
        Accuracy fallback: leave the most sensitive ops in float until the
        objective is within ``max_drop`` (absolute) of the FP32 model's.
    smoothquant_alpha : float or str
        Migration strength α of the ``smoothquant`` pass, in (0, 1]
        (0.5 as in the SmoothQuant paper), or ``"auto"``: α per site, chosen
        on that site's quantized output error.
    bias_correction_error : str
        What the ``bias_correction`` pass corrects: ``"weight"`` (default:
        the weight quantization error's share only) or ``"output"`` (the
        whole output shift of each quantized layer, input quantizer
        included; see
        :mod:`esc_plugin.core.transforms.bias_correction`).
    nan_policy : str
        ``"error"`` (default): a NaN or inf in a calibration activation stops
        the run with the layer and batch named; ``"ignore"``: non-finite
        values are left out of the statistics (and counted in the report).
    executor : str
        ESC: where each CMA-ES generation's candidates are evaluated:
        ``"serial"`` (default, in this process) or ``"ray"`` (``workers`` Ray
        actors, each sent the quantized copy and the objective once; needs
        ``pip install -e ".[ray]"``). Any executor ends with the same scales
        as ``"serial"``. See :mod:`esc_plugin.core.executors`.
    workers : int
        ``executor="ray"``: number of actors (1 or more).
    num_gpus_per_worker : float
        ``executor="ray"``: GPUs reserved per actor (1: one actor per GPU; 0: CPU actors).
    batch_candidates : int
        ESC: evaluate this many candidates in one forward pass, the
        calibration batch tiled k times with per-candidate activation scales
        (1: one by one). Needs an objective that declares it can be batched
        (the distillation objective and the built-in tasks' do); see
        :mod:`esc_plugin.core.batching`.
    keep_freed_memory : bool
        Before calibrating, make this process keep the heap memory its
        forwards free (:func:`esc_plugin.core.allocator.keep_freed_memory`:
        glibc malloc settings, process-wide and for good), so the search's
        repeated evaluations stop paging it back in. Faster on CPU, same
        scales; the process keeps its peak heap until it exits. Off by
        default because it changes the caller's process; the
        ``esc-quantize`` command and the Ray actors always do it. The report's
        notes say whether it took effect.
    """

    bits: int = 8
    method: str = "esc"
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    budget: int = 100
    sigma0: float = 0.3
    search_space: str = "log"
    popsize: Optional[int] = None
    restarts: int = 0
    n_samples: int = 100
    seed: int = 0
    percentiles: Tuple[float, ...] = (99.99, 99.999, 99.9999)
    histogram_bins: int = 2048
    init_grid: int = 32
    init_max_elements: int = 1 << 20  # seed studies: 1 << 18 let the init move with the seed
    exclude: Tuple[str, ...] = ()
    quantize_layernorm: bool = True
    quantize_attention: bool = False
    quantize_embeddings: bool = False
    init: str = "best"
    keep_init_if_worse: bool = True
    checkpoint: Optional[str] = None
    ptq: Tuple[str, ...] = ()
    distill: str = "auto"
    distill_weight: float = 0.0
    selection_split: Optional[float] = 0.2
    distance_gate: Optional[float] = 2.0
    fallback_layers: int = 0
    max_drop: Optional[float] = None
    smoothquant_alpha: Union[float, str] = 0.5
    bias_correction_error: str = "weight"
    nan_policy: str = "error"
    executor: str = "serial"
    workers: int = 1
    num_gpus_per_worker: float = 0.0
    batch_candidates: int = 1
    keep_freed_memory: bool = False

    def __post_init__(self):
        from .registry import check_transform_order, get_calibrator, get_transform

        self.method = _string("method", self.method)
        get_calibrator(self.method)
        for name in ("bits", "weight_bits", "act_bits"):
            value = getattr(self, name)
            if value is None and name != "bits":
                setattr(self, name, self.bits)
                continue
            _integer(name, value, "8 (W8A8) or 4 (W4A4)")
            if value not in SUPPORTED_BITS:
                raise ConfigError(
                    f"{name}={value} is not supported: use 8 (W8A8) or 4 (W4A4), "
                    "or set weight_bits / act_bits to 4 or 8 each."
                )
        _choice("search_space", self.search_space, ("log", "range"))
        _choice("init", self.init, ("output_mse", "best"))
        _choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _choice("bias_correction_error", self.bias_correction_error, ("output", "weight"))
        _choice("distill", self.distill, ("auto", "kl", "mse"))
        if isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, numbers.Real) \
                or self.distill_weight < 0:
            raise ConfigError(f"distill_weight={_kind(self.distill_weight)} must be a number >= 0.")
        if self.selection_split is not None:
            if isinstance(self.selection_split, bool) or not isinstance(self.selection_split, numbers.Real) \
                    or not 0 < self.selection_split <= 0.5:
                raise ConfigError(f"selection_split={_kind(self.selection_split)} must be in (0, 0.5] "
                                  "(e.g. 0.2), or None to turn the selection guard off.")
        if self.distance_gate is not None and (isinstance(self.distance_gate, bool) or not isinstance(
                self.distance_gate, numbers.Real) or not self.distance_gate >= 1):
            raise ConfigError(f"distance_gate={_kind(self.distance_gate)} must be a number >= 1 (e.g. 2.0: "
                              "candidates at most twice as far from the FP32 outputs as the closest), or None.")
        _integer("budget", self.budget, "the number of objective evaluations, e.g. 100", low=1)
        _number("sigma0", self.sigma0, "the initial CMA-ES step size, e.g. 0.1 (the paper)")
        if self.popsize is not None:
            _integer("popsize", self.popsize, "an integer >= 2 (or None for cma's default)", low=2)
        _integer("restarts", self.restarts, "the number of IPOP restarts, e.g. 0 (one run) or 1", low=0)
        _integer("n_samples", self.n_samples, "the number of calibration samples, e.g. 100", low=1)
        # cma treats seed 0 as "seed from the clock": only non-negative seeds are reproducible
        _integer("seed", self.seed, "a non-negative integer (runs are reproducible given it)", low=0)
        _integer("init_grid", self.init_grid, "the number of candidate scales per layer, e.g. 32", low=4)
        _integer("init_max_elements", self.init_max_elements, "a positive element count", low=1)
        _integer("histogram_bins", self.histogram_bins, "a bin count >= 256, e.g. 2048", low=256)
        if isinstance(self.percentiles, numbers.Real) and not isinstance(self.percentiles, bool):
            self.percentiles = (self.percentiles,)
        self.percentiles = _strings_or_numbers("percentiles", self.percentiles, number=True)
        if not self.percentiles or not all(0 < p <= 100 for p in self.percentiles):
            raise ConfigError(f"percentiles={self.percentiles} must be values in (0, 100], e.g. (99.99, 99.999).")
        self.exclude = _strings_or_numbers("exclude", self.exclude)
        self.ptq = _strings_or_numbers("ptq", self.ptq)
        _integer("fallback_layers", self.fallback_layers, "the number of ops to leave in float", low=0)
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or
                                          not isinstance(self.max_drop, numbers.Real) or self.max_drop < 0):
            raise ConfigError(f"max_drop={_kind(self.max_drop)} must be a number >= 0 (the allowed increase "
                              "of the objective over FP32, e.g. 0.01), or None.")
        if (self.fallback_layers or self.max_drop is not None) and "fallback" not in self.ptq:
            self.ptq = self.ptq + ("fallback",)
        for name in self.ptq:
            get_transform(name)
        if self.smoothquant_alpha != "auto":
            _number("smoothquant_alpha", self.smoothquant_alpha,
                    "the SmoothQuant migration strength in (0, 1], or 'auto' (per site)")
            if self.smoothquant_alpha > 1:
                raise ConfigError(f"smoothquant_alpha={self.smoothquant_alpha} must be in (0, 1], e.g. 0.5, "
                                  "or 'auto' (per site).")
        if len(set(self.ptq)) != len(self.ptq):
            raise ConfigError(f"ptq={self.ptq} names a pass twice: list each pass once.")
        check_transform_order(self.ptq)
        for name in ("quantize_layernorm", "quantize_attention", "quantize_embeddings", "keep_init_if_worse",
                     "keep_freed_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false.")
        _check_execution(self)
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise ConfigError(f"checkpoint={self.checkpoint!r} must be a file path (str) or None.")
        if self.checkpoint is not None:
            self.checkpoint = os.fspath(self.checkpoint)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from a dict, rejecting keys that do not exist (with the valid ones)."""
        if not isinstance(values, dict):
            raise ConfigError(f"quantization options must be a mapping, got {type(values).__name__}.")
        _check_keys(values)
        return cls(**values)


def option_names():
    """Every QuantConfig field name, sorted."""
    return sorted(f.name for f in fields(QuantConfig))


def _check_keys(values):
    known = option_names()
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [m for k in unknown for m in difflib.get_close_matches(k, known, n=1)]
        hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
        raise ConfigError(f"unknown quantization option(s) {unknown}{hint}: valid options are {', '.join(known)}.")


_DATACLASS_INIT = QuantConfig.__init__


def _init(self, *args, **kwargs):
    _check_keys(kwargs)
    _DATACLASS_INIT(self, *args, **kwargs)


_init.__doc__ = _DATACLASS_INIT.__doc__
_init.__signature__ = __import__("inspect").signature(_DATACLASS_INIT)
QuantConfig.__init__ = _init


def _check_execution(cfg):
    """``executor`` / ``workers`` / ``num_gpus_per_worker`` / ``batch_candidates``."""
    from .executors import executor_names

    _string("executor", cfg.executor)
    _choice("executor", cfg.executor, executor_names())
    _integer("workers", cfg.workers, "the number of Ray actors, e.g. 2", low=1)
    if cfg.workers > 1 and cfg.executor == "serial":
        raise ConfigError(f"workers={cfg.workers} needs executor='ray' (the serial executor has one worker: "
                          "this process).")
    gpus = cfg.num_gpus_per_worker
    if isinstance(gpus, bool) or not isinstance(gpus, numbers.Real) or gpus < 0:
        raise ConfigError(f"num_gpus_per_worker={_kind(gpus)} must be a number >= 0 (1: one actor per GPU, "
                          "0: CPU actors).")
    if gpus and cfg.executor == "serial":
        raise ConfigError(f"num_gpus_per_worker={gpus} needs executor='ray' (the serial executor runs on the "
                          "model's own device).")
    _integer("batch_candidates", cfg.batch_candidates, "the candidates per forward pass, e.g. 1 or 16", low=1)


def _kind(value):
    return f"{value!r} ({type(value).__name__})"


def _integer(name, value, what, low=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name}={_kind(value)} must be an integer: {what}.")
    if low is not None and value < low:
        raise ConfigError(f"{name}={value} must be >= {low}: {what}.")


def _number(name, value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ConfigError(f"{name}={_kind(value)} must be a number > 0: {what}.")


def _string(name, value):
    if not isinstance(value, str):
        raise ConfigError(f"{name}={_kind(value)} must be a string.")
    return value


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: use one of {', '.join(repr(c) for c in choices)}.")


def _strings_or_numbers(name, value, number=False):
    """A tuple from a list/tuple (a single string is one item, not its characters)."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={_kind(value)} must be a list of {'numbers' if number else 'strings'}.")
    for v in value:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) if number else isinstance(v, str)
        if not ok:
            raise ConfigError(f"{name}: {_kind(v)} must be a {'number' if number else 'string'}.")
    return tuple(float(v) for v in value) if number else tuple(value)


def __getattr__(name):
    # METHODS used to be a constant here; it is now whatever the registry holds.
    if name == "METHODS":
        from .registry import calibrator_names

        return calibrator_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
