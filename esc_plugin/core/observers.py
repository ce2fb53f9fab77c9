"""Statistics collected from the FP32 activations during calibration passes."""
import torch

from .errors import CalibrationError


class ActivationObserver:
    """Watches one activation quantizer's input.

    Collects the running max |x|, optionally a histogram of |x| over a fixed
    range (second pass, once the max is known) and optionally a bounded uniform
    sample of the inputs for ESC's local search.
    """

    def __init__(self, row_features=None, max_elements=0, bins=0, hist_range=None, seed=0,
                 name="", nan_policy="error"):
        self.name, self.nan_policy = name, nan_policy
        self.amax = 0.0
        self.calls = 0
        self.nonfinite = 0
        self.row_features = row_features
        self.max_elements = max_elements
        self.bins = bins
        self.hist_range = hist_range
        self.hist = torch.zeros(bins, dtype=torch.float64) if bins else None
        self._gen = torch.Generator().manual_seed(seed)
        self._rows = self._keys = None
        self._samples = []  # (key, tensor) for inputs that are not row-shaped

    def __call__(self, x):
        x = x.detach().float()
        self.calls += 1
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            if self.nan_policy == "error":
                raise CalibrationError(
                    f"the calibration input of '{self.name}' has {bad} NaN/inf value(s) in call "
                    f"{self.calls} of that op (batch {self.calls} of the forward loop if it runs once per "
                    "batch): fix the data or the layers before it, or pass "
                    "QuantConfig(nan_policy='ignore') to leave non-finite values out of the statistics.")
            self.nonfinite += bad
            x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        # torch max, not Python max: a NaN can never be dropped silently here
        self.amax = max(self.amax, float(x.abs().max())) if x.numel() else self.amax
        if self.hist is not None and self.hist_range:
            # histc runs where x lives (GPU or CPU); the running histogram stays on the CPU.
            self.hist += torch.histc(x.abs().clamp_max(self.hist_range), self.bins, 0, self.hist_range).double().cpu()
        if self.max_elements:
            self._sample(x)

    def _sample(self, x):
        # Uniform reservoir: every row/sample gets a random key; the top keys stay.
        if self.row_features and x.shape[-1] == self.row_features:
            rows = x.reshape(-1, self.row_features)
            keys = torch.rand(rows.shape[0], generator=self._gen)
            cap = max(1, self.max_elements // self.row_features)
            if self._rows is not None:
                rows, keys = torch.cat([self._rows, rows]), torch.cat([self._keys, keys])
            if rows.shape[0] > cap:
                keep = torch.topk(keys, cap).indices
                rows, keys = rows[keep], keys[keep]
            self._rows, self._keys = rows.clone(), keys
        else:
            for sample in x.split(1):
                self._samples.append((float(torch.rand(1, generator=self._gen)), sample.clone()))
            self._samples.sort(key=lambda kv: -kv[0])
            total = 0
            for n, (_, s) in enumerate(self._samples):
                total += s.numel()
                if total > self.max_elements and n > 0:
                    del self._samples[n:]
                    break

    def inputs(self):
        """The cached sample: a list of tensors shaped like the op's input."""
        if self._rows is not None:
            return [self._rows]
        # Batch samples of equal shape: one conv call instead of one per sample.
        groups = {}
        for _, s in self._samples:
            groups.setdefault(tuple(s.shape), []).append(s)
        return [torch.cat(g) for g in groups.values()]

    @property
    def edges(self):
        return torch.linspace(0, self.hist_range, self.bins + 1).double().numpy()
