"""The stage's front-end cache on a real Brain with SpeechBrain's own MFCC front end: the float
features are computed once per calibration batch, and every objective value ESC sees is the
same with and without the cache."""
import pytest
import torch
import speechbrain as sb
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.lobes.features import MFCC
from speechbrain.utils.metric_stats import ClassificationStats

from esc_plugin.speechbrain import quantize_brain

N_CLASSES = 4


class KeywordBrain(sb.Brain):
    """Waveforms -> MFCC (hparams, float) -> normalisation (modules, excluded) -> classifier."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, _ = batch.sig
        feats = self.hparams.compute_features(wavs)            # an nn.Module outside brain.modules
        feats = self.hparams.delta_energy(feats)                # a plain function in hparams
        feats = self.modules.norm(feats)                        # left in float by `exclude`
        return self.hparams.post(self.modules.model(feats.mean(1)))  # float, but behind quantized ops

    def compute_objectives(self, logits, batch, stage):
        target = batch.label.to(self.device)
        self.acc_metric.append(batch.id, logits.argmax(-1).unsqueeze(1), target.unsqueeze(1))
        return torch.nn.functional.cross_entropy(logits, target)

    def on_stage_start(self, stage, epoch=None):
        self.acc_metric = ClassificationStats()


def post(logits):
    return torch.log_softmax(logits, -1)


def delta_energy(feats):
    return torch.cat([feats, feats.pow(2).mean(-1, keepdim=True)], -1)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(4000) / 16000.0
    data = {}
    for i in range(n):
        label = i % N_CLASSES
        tone = torch.sin(2 * torch.pi * (300 + 400 * label) * t)
        data[f"u{seed}_{i}"] = {"sig": tone + 0.3 * torch.randn(4000, generator=g), "label": label}
    ds = DynamicItemDataset(data)
    ds.set_output_keys(["id", "sig", "label"])
    return ds


def build(out):
    torch.manual_seed(0)
    mfcc = MFCC(n_mfcc=13, deltas=False, context=False)
    calls = {"n": 0}
    # counts MFCC computations (a hook on MFCC itself would count cached calls too)
    mfcc.compute_STFT.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    model = torch.nn.Sequential(torch.nn.Linear(14, 32), torch.nn.ReLU(), torch.nn.Linear(32, N_CLASSES))
    norm = torch.nn.LayerNorm(14)
    hparams = {"compute_features": mfcc, "delta_energy": delta_energy, "post": post, "model": model, "norm": norm,
               "output_folder": str(out)}
    brain = KeywordBrain(modules={"model": model, "norm": norm}, opt_class=lambda p: torch.optim.Adam(p, 1e-2),
                         hparams=hparams, run_opts={"device": "cpu"})
    brain.fit(range(2), make_data(32, 1), train_loader_kwargs={"batch_size": 8}, progressbar=False)
    return brain, hparams, calls


@pytest.mark.parametrize("method", ["esc", "percentile"])
def test_cache_gives_identical_objectives_and_runs_the_front_end_once(tmp_path, method):
    results = {}
    for cache in (False, True):
        brain, hparams, calls = build(tmp_path / f"{method}_{cache}")
        hparams.update(quantize=method, quantization={
            "bits": 8, "budget": 6, "n_samples": 24, "seed": 0, "exclude": ["norm"], "cache_front_end": cache})
        calls["n"] = 0
        result = quantize_brain(brain, hparams, calib_set=make_data(24, 2), loader_kwargs={"batch_size": 8},
                                progress=False)
        results[cache] = (result, calls["n"])
        assert "compute_features" in vars(brain.hparams) and brain.hparams.delta_energy is delta_energy
        assert "forward" not in vars(brain.hparams.compute_features)  # the cache's wrapper is gone
    (plain, plain_calls), (cached, cached_calls) = results[False], results[True]
    assert plain.report.history == cached.report.history
    assert plain.metrics["calibration_objective"] == cached.metrics["calibration_objective"]
    assert cached_calls == 3 and plain_calls > 3  # 3 calibration batches: MFCC once each
    note = cached.report.notes[-1]
    assert note.startswith("front-end cache: compute_features, delta_energy, modules.norm")
    # `post` sees the quantized model's logits: its inputs change, so it is always recomputed.
    # (a calibration pass with the quantizers still off gives it FP32 inputs: those calls hit, exactly.)
    recomputed = int(note.split(" cached calls, ")[1].split()[0])
    assert 0 < recomputed <= 3 * (plain_calls // 3 - 1)
