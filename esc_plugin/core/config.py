"""Quantization configuration (a plain dataclass, like torchao's config objects).

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
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

from .errors import ConfigError

METHODS = ("max", "percentile", "entropy", "mse", "esc")
SUPPORTED_BITS = (4, 8)


@dataclass
class QuantConfig:
    """What to quantize and how to calibrate it.

    Arguments
    ---------
    bits : int
        Bit width for weights and activations (8 = W8A8, 4 = W4A4).
    method : str
        Activation calibrator: ``max``, ``percentile``, ``entropy``, ``mse`` or ``esc``.
    weight_bits, act_bits : int, optional
        Override ``bits`` for weights / activations independently (e.g. W4A8).
    budget : int
        ESC: number of CMA-ES objective evaluations (Γ in the paper).
    sigma0 : float
        ESC: initial CMA-ES step size (0.1 as in the paper), relative: see ``search_space``.
    search_space : str
        ESC: ``"log"`` (default) searches log-multipliers of the local init
        (σ0 ≈ ±10 %); ``"range"`` searches each scale as a fraction of its
        layer's observed max (σ0 = a tenth of the range): it lowers the
        calibration objective further but over-fits 100 samples more (honk
        W8A8: 84.9 % vs 86.0 % eval accuracy). See :mod:`esc_plugin.core.search`.
    popsize : int, optional
        ESC: CMA-ES population size; default is cma's ``4 + 3 ln(N)``.
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
        ESC: cap on cached input elements per layer for the local search.
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
        ESC: ``"output_mse"`` (paper Eq. 4) starts CMA-ES from the per-layer
        output-MSE grid search; ``"best"`` also evaluates the max / percentile /
        entropy / mse scales on the objective and starts from whichever scores
        best (ESC composed with the baselines; costs a histogram pass and ~6
        extra evaluations).
    keep_init_if_worse : bool
        ESC: if the mean of the final search distribution scores worse on the
        objective than the local init, keep the init (recorded in the report).
    checkpoint : str, optional
        ESC: file holding the CMA-ES state, written every generation; an
        interrupted run restarted with the same file resumes where it stopped.
    """

    bits: int = 8
    method: str = "esc"
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    budget: int = 100
    sigma0: float = 0.1
    search_space: str = "log"
    popsize: Optional[int] = None
    n_samples: int = 100
    seed: int = 0
    percentiles: Tuple[float, ...] = (99.99, 99.999, 99.9999)
    histogram_bins: int = 2048
    init_grid: int = 32
    init_max_elements: int = 1 << 18
    exclude: Tuple[str, ...] = ()
    quantize_layernorm: bool = True
    quantize_attention: bool = False
    quantize_embeddings: bool = False
    init: str = "output_mse"
    keep_init_if_worse: bool = True
    checkpoint: Optional[str] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(
                f"method={self.method!r} is unknown: choose one of {', '.join(METHODS)}."
            )
        if self.weight_bits is None:
            self.weight_bits = self.bits
        if self.act_bits is None:
            self.act_bits = self.bits
        for name in ("bits", "weight_bits", "act_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not supported: use 8 (W8A8) or 4 (W4A4), "
                    "or set weight_bits / act_bits to 4 or 8 each."
                )
        if self.search_space not in ("range", "log"):
            raise ConfigError(f"search_space={self.search_space!r}: use 'range' or 'log'.")
        if self.init not in ("output_mse", "best"):
            raise ConfigError(f"init={self.init!r}: use 'output_mse' (paper) or 'best'.")
        if self.budget < 1:
            raise ConfigError(f"budget={self.budget} must be >= 1 objective evaluations.")
        if not self.sigma0 > 0:
            raise ConfigError(f"sigma0={self.sigma0} must be > 0 (the paper uses 0.1).")
        if self.popsize is not None and self.popsize < 2:
            raise ConfigError(f"popsize={self.popsize} must be >= 2 (or None for cma's default).")
        if self.n_samples < 1:
            raise ConfigError(f"n_samples={self.n_samples} must be >= 1.")
        if self.init_grid < 4:
            raise ConfigError(f"init_grid={self.init_grid} must be >= 4 candidate scales.")
        if self.histogram_bins < 256:
            raise ConfigError(f"histogram_bins={self.histogram_bins} must be >= 256.")
        self.percentiles = tuple(float(p) for p in self.percentiles)
        if not self.percentiles or not all(0 < p <= 100 for p in self.percentiles):
            raise ConfigError(f"percentiles={self.percentiles} must be values in (0, 100].")
        self.exclude = tuple(self.exclude)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from a dict, rejecting keys that do not exist (with the valid ones)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown quantization option(s) {unknown}: valid options are {sorted(known)}."
            )
        return cls(**values)
