"""What a quantization run did: per-layer scales, objective history, coverage, timings."""
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

from .io import write_json


@dataclass
class LayerScales:
    """amax of one activation quantizer under each stage (None = stage not run)."""

    name: str
    op: str
    max: float
    init: Optional[float] = None   # ESC local init (output MSE) or the baseline's value
    final: Optional[float] = None


@dataclass
class QuantReport:
    config: dict
    layers: List[LayerScales] = field(default_factory=list)
    coverage: List[dict] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)   # ESC: one entry per evaluation
    objective: Dict[str, float] = field(default_factory=dict)  # e.g. init / final / chosen
    timings: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    ptq: List[dict] = field(default_factory=list)  # PTQ passes in the order they ran, with times
    selection: List[dict] = field(default_factory=list)  # guard: search vs held-back score per candidate
    sensitivity: List[dict] = field(default_factory=list)  # fallback: objective gain with one op in float

    @property
    def quantized_ops(self):
        return [c for c in self.coverage if c["quantized"]]

    @property
    def float_ops(self):
        return [c for c in self.coverage if not c["quantized"]]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = {k: v for k, v in dict(d).items() if k in {f.name for f in fields(cls)}}
        d["layers"] = [LayerScales(**l) for l in d.get("layers", [])]
        return cls(**d)

    def save_json(self, path):
        write_json(path, self.to_dict())

    def summary(self):
        q, f = len(self.quantized_ops), len(self.float_ops)
        lines = [f"method={self.config['method']} W{self.config['weight_bits']}A{self.config['act_bits']}: "
                 f"{q} quantized ops, {f} left in float"]
        for key, value in self.objective.items():
            lines.append(f"  objective[{key}] = {value:.6g}")
        for key, value in self.timings.items():
            unit = "" if key.startswith("n_") else " s"
            lines.append(f"  time[{key}] = {value:.3g}{unit}")
        for p in self.ptq:
            lines.append(f"  ptq[{p['name']}] ({p['stage']}) {p['seconds']:.3g} s")
        lines.extend("  note: " + n for n in self.notes)
        return "\n".join(lines)

    def plot(self, folder):
        """Write ``convergence.png`` (ESC), ``amax.png`` and ``sensitivity.png`` (fallback); returns the paths."""
        from .plots import plot_amax, plot_convergence, plot_sensitivity

        paths = [plot_amax(self, folder)]
        if self.history:
            paths.append(plot_convergence(self, folder))
        if self.sensitivity:
            paths.append(plot_sensitivity(self, folder))
        return paths
