"""Core v2: registries, versioned state, and the reliability defects (each a regression test).

Real torch / SpeechBrain / modelopt objects, no mocks.
"""
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import esc_plugin as esc
from conftest import loop_and_output_error
from esc_plugin.core.errors import CalibrationError, ConfigError, ObjectiveError, QuantizationError
from esc_plugin.core.registry import register_calibrator, unregister_calibrator


class KwsNet(nn.Module):
    """A small keyword-spotting shaped model: Conv1d front end, LayerNorm, MHA, Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(12, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        h = self.norm(h)
        h, _ = self.mha(h, h, h)
        return self.out(torch.relu(self.fc(h))).mean(1)


@pytest.fixture(scope="module")
def kws():
    torch.manual_seed(0)
    model = KwsNet().eval()
    data = [torch.randn(4, 10, 12) * torch.linspace(0.1, 20, 12) for _ in range(3)]
    loop, objective = loop_and_output_error(model, data)
    return model, data, loop, objective


# ------------------------------------------------------------------ registries

def test_a_calibrator_is_one_registered_class(kws):
    model, data, loop, objective = kws

    @register_calibrator("half_max_test", needs=("max",), summary="half the max")
    class HalfMax:
        def __init__(self, config):
            self.config = config

        def calibrate(self, ctx):
            return ctx.maxes / 2

    try:
        assert "half_max_test" in esc.calibrator_names()
        q = esc.quantize(model, esc.QuantConfig(method="half_max_test"), loop, progress=False)
        assert all(abs(l.final - l.max / 2) <= 1e-6 * l.max for l in q.esc_report.layers)
    finally:
        unregister_calibrator("half_max_test")
    with pytest.raises(ConfigError, match="half_max_test.*unknown|unknown.*max, percentile"):
        esc.QuantConfig(method="half_max_test")


def test_output_mse_is_escs_local_init_alone(kws):
    """The ``output_mse`` row is exactly the scales ESC starts its search from."""
    model, data, loop, objective = kws
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alone = esc.quantize(model, esc.QuantConfig(method="output_mse"), loop, progress=False).esc_report
    searched = esc.quantize(model, esc.config_for("esc_paper", budget=4), loop, objective, progress=False)
    assert [l.final for l in alone.layers] == pytest.approx([l.init for l in searched.esc_report.layers])
    assert alone.timings["n_evaluations"] == 0  # no objective: nothing is searched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_method_and_pass_list_the_registry():
    with pytest.raises(ConfigError, match="max, percentile, entropy, mse, esc"):
        esc.QuantConfig(method="kl")
    with pytest.raises(ConfigError, match="smoothquant"):
        esc.QuantConfig(ptq=("smoothquant2",))


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": "8"}, "bits='8' \\(str\\) must be an integer"),
    ({"budget": "100"}, "budget='100' \\(str\\) must be an integer"),
    ({"seed": None}, "seed=None .* must be an integer"),
    ({"seed": -1}, "seed=-1 must be >= 0"),
    ({"checkpoint": 123}, "checkpoint=123 must be a file path"),
    ({"budjet": 5}, "did you mean 'budget'.*valid options are act_bits"),
    ({"selection": 1}, "valid options are"),
    ({"quantize_attention": "yes"}, "must be true or false"),
    ({"ptq": ("smoothquant", "smoothquant")}, "twice"),
    ({"ptq": ("fallback", "bias_correction")}, "out of order: write \\('bias_correction', 'fallback'\\)"),
    ({"smoothquant_alpha": 1.5}, "in \\(0, 1\\]"),
    ({"nan_policy": "drop"}, "'error', 'ignore'"),
])
def test_bad_config_values_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        esc.QuantConfig(**kwargs)


def test_config_accepts_natural_spellings():
    assert esc.QuantConfig(exclude="head").exclude == ("head",)
    assert esc.QuantConfig(percentiles=99.9).percentiles == (99.9,)
    assert esc.QuantConfig(ptq="smoothquant").ptq == ("smoothquant",)


def test_presets_give_one_name_per_variant():
    cfg = esc.config_for("esc_initbest", bits=4)
    assert (cfg.method, cfg.init, esc.label_of(cfg)) == ("esc", "best", "esc_initbest")
    assert esc.label_of(esc.QuantConfig(method="max")) == "max"


# ------------------------------------------------------------------ reliability

def test_nan_in_calibration_data_is_an_error_naming_the_layer(kws):
    model, data, loop, objective = kws
    bad = [d.clone() for d in data]
    bad[1][0, 3, 2] = float("nan")

    def bad_loop(m):
        for x in bad:
            m(x)

    with pytest.raises(CalibrationError, match="'conv' has 1 NaN/inf value.*call 2.*nan_policy='ignore'"):
        esc.quantize(model, esc.QuantConfig(budget=4), bad_loop, objective, progress=False)
    q = esc.quantize(model, esc.QuantConfig(budget=4, nan_policy="ignore"), bad_loop, objective, progress=False)
    conv = next(l for l in q.esc_report.layers if l.name == "conv")
    # the scale follows the finite data instead of collapsing to the grid floor
    assert conv.init > 1e-2 * conv.max
    assert any("non-finite" in n for n in q.esc_report.notes)


def test_objective_that_is_never_finite_fails_loudly(kws):
    model, data, loop, objective = kws
    with pytest.raises(ObjectiveError, match="NaN or inf for all"):
        esc.quantize(model, esc.QuantConfig(budget=4, popsize=2), loop, lambda m: float("inf"), progress=False)


def test_search_spends_exactly_the_budget(kws):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(budget=10, popsize=4), loop, objective, progress=False)
    assert q.esc_report.timings["n_search_evaluations"] == 10 == len(q.esc_report.history)


def test_requantizing_a_quantized_model_names_the_fix(kws):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(method="max"), loop, progress=False)
    with pytest.raises(QuantizationError, match="already quantized .*: pass the FP32 model"):
        esc.quantize(q, esc.QuantConfig(method="max"), loop, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_esc_on_half_precision_models(kws, dtype):
    model, data, loop, objective = kws
    half = KwsNet().eval()
    half.load_state_dict(model.state_dict())
    half = half.to(dtype)

    def hloop(m):
        for x in data:
            m(x.to(dtype))

    def hobjective(m):
        return sum(float(((m(x.to(dtype)).float() - model(x)) ** 2).mean()) for x in data)

    q = esc.quantize(half, esc.QuantConfig(budget=4, popsize=2), hloop, hobjective, progress=False)
    assert all(np.isfinite(l.final) and l.final > 0 for l in q.esc_report.layers)
    assert np.isfinite(q.esc_report.objective["chosen"])


# ------------------------------------------------------------------ state files

def test_state_v2_roundtrip_and_digest(kws, tmp_path):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(budget=4), loop, objective, progress=False)
    path = esc.save(q, tmp_path / "q.pt")
    state = torch.load(path, weights_only=True)
    assert state["format"] == "esc_plugin.quantized/2" and len(state["fp32_digest"]) == 64
    assert state["weights"] and all(isinstance(v, torch.Tensor) for v in state["weights"].values())
    r = esc.load(model, path)
    with torch.no_grad():
        assert torch.equal(q(data[0]), r(data[0]))
    flipped = KwsNet().eval()
    flipped.load_state_dict({k: -v for k, v in model.state_dict().items()})  # same sum of |w|
    with pytest.raises(ConfigError, match="different weights"):
        esc.load(flipped, path)


def test_state_v1_files_still_load(kws, tmp_path):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(method="max"), loop, progress=False)
    plan = q.esc_plan
    from esc_plugin.core.state import weights_sum_fingerprint

    v1 = {"format": "esc_plugin.quantized/1",
          "config": {k: v for k, v in plan.config.to_dict().items() if k not in ("ptq", "nan_policy",
                                                                                  "smoothquant_alpha")},
          "amax": {p.name: float(p.input_quantizer.amax) for p in plan.points},
          "sites": [(n,) + tuple(s) for n, m in q.named_modules() for s in getattr(m, "esc_sites", [])],
          "attention_sites": [], "weights_fingerprint": weights_sum_fingerprint(plan), "report": None}
    torch.save(v1, tmp_path / "v1.pt")
    r = esc.load(model, tmp_path / "v1.pt")
    with torch.no_grad():
        assert torch.equal(q(data[0]), r(data[0]))


class _Exploit:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Exploit.ran = True
    return {"format": "esc_plugin.quantized/2"}


def test_loading_never_runs_code_from_a_file(kws, tmp_path):
    model, data, loop, objective = kws
    path = tmp_path / "evil.pt"
    torch.save({"format": "esc_plugin.quantized/2", "payload": _Exploit()}, path)
    with pytest.raises(ConfigError, match="never loaded"):
        esc.load(model, path)
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(ConfigError):
        esc.quantize(model, esc.QuantConfig(budget=4, checkpoint=str(ckpt)), loop, objective, progress=False)
    assert not _Exploit.ran


def test_truncated_files_name_the_path(kws, tmp_path):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(method="max"), loop, progress=False)
    path = esc.save(q, tmp_path / "q.pt")
    data_bytes = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(ConfigError, match=f"{path}.*truncated or corrupt"):
        esc.load(model, path)


def test_checkpoint_from_other_calibration_data_is_refused(kws, tmp_path):
    model, data, loop, objective = kws
    ckpt = str(tmp_path / "cma.ckpt")
    esc.quantize(model, esc.QuantConfig(budget=4, popsize=2, checkpoint=ckpt), loop, objective, progress=False)
    state = torch.load(ckpt, weights_only=True)
    assert set(state) == {"format", "fingerprint", "init", "init_objective", "generations", "calibrator"}
    starts = state["calibrator"]["starts"]  # plain names, tensors and numbers (loaded with weights_only)
    assert 1 <= len(starts) <= 4 and all(isinstance(s["amax"], torch.Tensor) and isinstance(s["name"], str)
                                         for s in starts)

    def other_loop(m):
        for x in data:
            m(x * 1.5)

    with pytest.raises(ConfigError, match="another run .*calibration data"):
        esc.quantize(model, esc.QuantConfig(budget=4, popsize=2, checkpoint=ckpt), other_loop, objective,
                     progress=False)
    other = KwsNet().eval()
    with pytest.raises(ConfigError, match="another run"):
        esc.quantize(other, esc.QuantConfig(budget=4, popsize=2, checkpoint=ckpt), loop, objective,
                     progress=False)


# ------------------------------------------------------------------ SmoothQuant (first PTQ pass)

def test_smoothquant_is_exact_in_float_and_helps_outlier_channels(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    scale = torch.ones(16)
    scale[3] = 80.0  # one outlier input channel, as in transformer residual streams
    data = [torch.randn(32, 16) * scale for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loop(m):
        for x in data:
            m(x)

    def error(m):
        with torch.no_grad():
            return sum(float(((m(x) - model(x)) ** 2).mean()) for x in data)

    plain = esc.quantize(model, esc.QuantConfig(method="max"), loop, progress=False)
    smooth = esc.quantize(model, esc.QuantConfig(method="max", ptq=("smoothquant",)), loop, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # FP32 untouched
    assert error(smooth) < error(plain)
    # with every quantizer off the smoothed copy computes the FP32 function
    plan = smooth.esc_plan
    for p in plan.points:
        p.input_quantizer.disable()
    for wq in plan.weight_quantizers():
        wq.disable()
    with torch.no_grad():
        assert torch.allclose(smooth(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)
    for p in plan.points:
        p.input_quantizer.enable()
    for wq in plan.weight_quantizers():
        wq.enable()
    path = esc.save(smooth, tmp_path / "sq.pt")
    again = esc.load(model, path)
    with torch.no_grad():
        assert torch.equal(again(data[1]), smooth(data[1]))
    assert [p["name"] for p in again.esc_report.ptq] == ["smoothquant"]


def test_smoothquant_on_a_model_without_linear_layers_names_the_fix():
    model = nn.Sequential(nn.LayerNorm(4)).eval()
    with pytest.raises(ConfigError, match="needs nn.Linear or nn.Conv1d/2d.*drop 'smoothquant'"):
        esc.quantize(model, esc.QuantConfig(method="max", ptq=("smoothquant",)), lambda m: m(torch.randn(2, 4)),
                     progress=False)


# ------------------------------------------------------------------ label-free objective and guard

def test_esc_without_objective_distills_from_the_fp32_outputs(kws):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(bits=4, budget=8, popsize=4, init="output_mse"), loop, progress=False)
    report = q.esc_report
    assert any("distillation to the FP32 outputs (mse, inferred)" in n for n in report.notes)
    # the guard compared the search mean, the best sample and the init on held-back calls
    assert {r["name"] for r in report.selection} == {"mean", "best_sample", "init"}
    assert all(r["selection"] is not None for r in report.selection)
    assert any("selection" in h for h in report.history)
    assert report.timings["n_evaluations"] <= 8 + 4  # init, Γ candidates, mean, guard re-scores
    assert esc.quantize(model, esc.QuantConfig(bits=4, budget=8, popsize=4, init="output_mse"), loop,
                        progress=False).esc_report.layers[0].final == report.layers[0].final  # deterministic



def test_distillation_ignores_the_masked_outputs_of_the_fp32_model():
    # FastSpeech 2's aligner returns log-probabilities with -inf over padding: every distance was NaN,
    # so label-free ESC failed with "NaN or inf for all evaluations"
    from esc_plugin.core.distill import _kl, _mse

    torch.manual_seed(0)
    t = torch.randn(3, 5, 6)
    t[:, 3:, :] = float("-inf")  # padded frames
    t[:, :, 4:] = float("-inf")  # masked classes
    q = t.clone()
    q[:, :3, :4] += 0.1 * torch.randn(3, 3, 4)
    for distance in (_mse, _kl):
        d = distance(q, t)
        assert d.shape == (3,) and torch.isfinite(d).all() and (d > 0).all()
        assert torch.equal(distance(t.clone(), t), torch.zeros(3))
        finite = t.clone()
        finite[torch.isinf(finite)] = 0.0  # all-finite outputs keep the plain formula
        assert torch.isfinite(distance(q.nan_to_num(neginf=0.0), finite)).all()
    worse = q.clone()
    worse[0, 0, 0] = float("inf")  # the quantized model overflows where the FP32 one is finite
    assert torch.isinf(_mse(worse, t)[0]) and torch.isfinite(_mse(worse, t)[1:]).all()

    class Aligner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            logp = torch.log_softmax(self.fc(x), -1)
            return logp.masked_fill(torch.arange(6) >= 4, float("-inf"))

    data = [torch.randn(4, 6) for _ in range(3)]
    q = esc.quantize(Aligner().eval(), esc.QuantConfig(bits=4, budget=8, popsize=4),
                     lambda m: [m(x) for x in data], progress=False)
    assert np.isfinite(q.esc_report.objective["chosen"])

def test_distillation_needs_tensor_outputs():
    class Words(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            self.fc(x)
            return "yes"

    with pytest.raises(CalibrationError, match="no tensor outputs.*or pass an objective"):
        esc.quantize(Words().eval(), esc.QuantConfig(budget=4), lambda m: m(torch.randn(2, 4)), progress=False)


@pytest.mark.parametrize("kwargs", [{"selection_split": 0.7}, {"selection_split": 0}, {"distill": "l1"},
                                    {"distill_weight": -1}])
def test_bad_guard_and_distill_options(kwargs):
    with pytest.raises(ConfigError):
        esc.QuantConfig(**kwargs)


def test_split_aware_objective_is_guarded(kws):
    model, data, loop, objective = kws
    calls = {"search": 0, "select": 0}

    class Split:
        def __call__(self, m):
            return objective(m)

        def split(self, fraction):
            def search(m):
                calls["search"] += 1
                return objective(m)

            def select(m):
                calls["select"] += 1
                return objective(m)
            return search, select

    q = esc.quantize(model, esc.QuantConfig(bits=4, budget=6, popsize=3, init="output_mse"), loop, Split(),
                     progress=False)
    assert calls["select"] == 3 and [r["name"] for r in q.esc_report.selection] == ["mean", "best_sample", "init"]


def test_the_guard_also_weighs_the_starts_the_search_did_not_take(kws):
    """With init="best" the output-MSE init and every baseline are candidates on the held-back part:
    a held-back part that prefers the largest scales (max calibration) gets them, whatever the
    search part preferred."""
    from esc_plugin.core.quantizers import ActivationQuantizer

    model, data, loop, objective = kws

    def largest_scales(m):
        return -sum(float(q.amax) for q in m.modules() if isinstance(q, ActivationQuantizer) and q.amax is not None)

    class Split:
        def __call__(self, m):
            return objective(m)

        def split(self, fraction):
            return objective, largest_scales

    q = esc.quantize(model, esc.QuantConfig(bits=4, budget=6, popsize=3), loop, Split(), progress=False)
    rows = q.esc_report.selection
    names = [r["name"] for r in rows]
    starts = {"start_output_mse", "start_max", "start_percentile", "start_entropy", "start_mse"}
    assert names[:3] == ["mean", "best_sample", "init"] and set(names[3:]) < starts and len(names) == 7
    assert all(r["selection"] is not None and r["search"] is not None for r in rows)
    maxed = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    assert [la.final for la in q.esc_report.layers] == [la.final for la in maxed.esc_report.layers]
    assert any("chose the start_max" in n or "chose the init" in n for n in q.esc_report.notes)


class _ClippingObjective:
    """A splittable objective that rewards clipping: the sum of the activation scales, on both parts
    (so the selection guard weighs every candidate); ``crash_at``: the call that raises KeyboardInterrupt."""

    def __init__(self, crash_at=None):
        self.calls, self.crash_at = 0, crash_at

    def scales(self, m):
        from esc_plugin.core.quantizers import ActivationQuantizer

        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return sum(float(q.amax) for q in m.modules() if isinstance(q, ActivationQuantizer) and q.amax is not None)

    def __call__(self, m):
        return self.scales(m)

    def split(self, fraction):
        return self.scales, self.scales


def test_the_distance_gate_keeps_start_candidates_far_from_the_fp32_outputs_out(kws):
    """An objective that rewards clipping prefers the smallest scales (entropy's here). With the
    gate (default: at most 2x the closest candidate's distance to the FP32 outputs) a candidate
    beyond it is neither the start nor kept by the guard; without it, the objective alone decides."""
    model, data, loop, objective = kws
    Split = _ClippingObjective
    names = ("output_mse", "max", "percentile", "entropy", "mse")
    plain = esc.quantize(model, esc.QuantConfig(bits=8, budget=6, popsize=3, distance_gate=None), loop, Split(),
                         progress=False)
    started = [n for n in plain.esc_report.notes if n.startswith("ESC started from")]
    assert started and "entropy" in started[0] and "n_distance_evaluations" not in plain.esc_report.timings
    assert not any(k.startswith("distance_") for k in plain.esc_report.objective)

    q = esc.quantize(model, esc.QuantConfig(bits=8, budget=6, popsize=3), loop, Split(), progress=False)
    obj = q.esc_report.objective
    distance = {n: obj[f"distance_{n}"] for n in names}
    far = {n for n in names if distance[n] > 2 * min(distance.values())}
    assert "entropy" in far and len(far) < len(names)
    # the five start candidates, then the search mean and best sample before the guard weighs them
    assert q.esc_report.timings["n_distance_evaluations"] == len(names) + 2
    assert {"distance_mean", "distance_best_sample"} <= set(obj)
    kept = {r["name"] for r in q.esc_report.selection}
    assert not kept & {f"start_{n}" for n in far}
    assert not any(n.startswith("ESC started from the entropy") for n in q.esc_report.notes)
    assert any(n.startswith("distance gate: left out") and "entropy" in n for n in q.esc_report.notes)
    for bad in (0.5, float("nan"), True, "2"):
        with pytest.raises(ConfigError, match="distance_gate"):
            esc.QuantConfig(distance_gate=bad)


def test_the_distance_gate_turns_off_when_the_loop_makes_other_model_calls(kws):
    """A loop whose model calls depend on the outputs (greedy decoding that stops earlier) gives no
    distance to compare: the gate is off with the reason, and the search runs on the objective."""
    model, data, loop, objective = kws
    runs = []

    def decoding_loop(m):  # like greedy decoding: one more call the first time (the FP32 recording)
        runs.append(1)
        loop(m)
        if len(runs) == 1:
            loop(m)

    q = esc.quantize(model, esc.QuantConfig(bits=8, budget=6, popsize=3), decoding_loop, _ClippingObjective(),
                     progress=False)
    notes = q.esc_report.notes
    assert any(n.startswith("distance gate off: the forward loop made") for n in notes)
    assert not any(n.startswith("distance gate: left out") for n in notes)
    assert q.esc_report.timings["n_evaluations"] >= 6 and len(q.esc_report.selection) > 3



def test_the_distance_gate_is_off_with_its_reason_when_no_distance_is_finite():
    # a non-finite distance reaches the gate as the evaluator's WORST_LOSS: all of them "equal" left
    # every candidate in, silently, instead of saying the gate could not measure anything
    from types import SimpleNamespace

    from esc_plugin.core.search import WORST_LOSS
    from esc_plugin.core.selection import gate_by_distance

    ctx = SimpleNamespace(distance=object(), report=SimpleNamespace(notes=[], objective={}))
    rows = [("init", np.ones(2), 1.0), ("start_max", np.ones(2), 2.0)]
    assert gate_by_distance(ctx, rows, 2.0, {"init": WORST_LOSS, "start_max": WORST_LOSS}) == {}
    assert ctx.report.notes == ["distance gate off: no candidate had a finite distance to the FP32 outputs"]
    assert gate_by_distance(ctx, rows, 2.0, {"init": 1.0, "start_max": WORST_LOSS}) == {"start_max": WORST_LOSS}

def test_a_resumed_search_weighs_the_same_start_candidates_as_an_uninterrupted_one(kws, tmp_path):
    """The start candidates and their distances are in the checkpoint: after a crash mid-search the
    selection guard and the distance gate see what an uninterrupted run sees, and end with its scales."""
    model, data, loop, objective = kws
    cfg = dict(bits=8, budget=9, popsize=3)
    whole = esc.quantize(model, esc.QuantConfig(**cfg), loop, _ClippingObjective(), progress=False)
    ckpt = tmp_path / "cma.ckpt"
    with pytest.raises(KeyboardInterrupt):  # 5 start candidates, then mid-way through the 2nd generation
        esc.quantize(model, esc.QuantConfig(**cfg, checkpoint=str(ckpt)), loop, _ClippingObjective(crash_at=10),
                     progress=False)
    resumed = esc.quantize(model, esc.QuantConfig(**cfg, checkpoint=str(ckpt)), loop, _ClippingObjective(),
                           progress=False)
    assert any("resumed" in n for n in resumed.esc_report.notes)
    assert resumed.esc_report.selection == whole.esc_report.selection
    assert len(whole.esc_report.selection) > 3  # start candidates other than the init were weighed
    assert [la.final for la in resumed.esc_report.layers] == [la.final for la in whole.esc_report.layers]


# ------------------------------------------------------------------ bias correction and fallback

def test_bias_correction_reduces_the_output_shift_and_reloads(kws, tmp_path):
    model, data, loop, objective = kws
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    bc = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("bias_correction",)), loop, progress=False)
    assert objective(bc) < objective(plain)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # FP32 untouched
    again = esc.load(model, esc.save(bc, tmp_path / "bc.pt"))
    with torch.no_grad():
        assert torch.equal(again(data[0]), bc(data[0]))


def test_weight_only_bias_correction_folds_the_weight_error_on_the_quantized_input(kws, tmp_path):
    model, data, loop, objective = kws
    plain = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    inputs = []
    handle = plain.out.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        loop(plain)
    handle.remove()
    with torch.no_grad():  # (W - W_q) · mean Q(x): the weight's share of the shift, nothing of the input's
        q_in = torch.cat([plain.out.input_quantizer(x).reshape(-1, x.shape[-1]) for x in inputs])
        w = plain.out.weight
        expected = (w - plain.out.weight_quantizer(w)) @ q_in.mean(0)
    cfg = esc.QuantConfig(bits=4, method="max", ptq=("bias_correction",), bias_correction_error="weight")
    bc = esc.quantize(model, cfg, loop, progress=False)
    assert torch.allclose(bc.out.bias - plain.out.bias, expected, atol=1e-5)
    assert esc.QuantConfig().bias_correction_error == "weight"  # the default, from the Table 2 rows
    whole = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("bias_correction",),
                                                bias_correction_error="output"), loop, progress=False)
    assert not torch.allclose(whole.out.bias, bc.out.bias, atol=1e-5)  # "output" also folds the input's share
    assert any("corrected the weight error" in n for n in bc.esc_report.notes)
    again = esc.load(model, esc.save(bc, tmp_path / "bcw.pt"))
    with torch.no_grad():
        assert torch.equal(again(data[0]), bc(data[0]))
    with pytest.raises(ConfigError, match="bias_correction_error='input': use one of 'output', 'weight'"):
        esc.QuantConfig(ptq=("bias_correction",), bias_correction_error="input")


def test_fallback_leaves_the_most_sensitive_ops_in_float(kws, tmp_path):
    model, data, loop, objective = kws
    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", fallback_layers=2), loop, objective,
                     progress=False)
    report = q.esc_report
    assert q.esc_plan.config.ptq == ("fallback",)
    top = [s["name"] for s in report.sensitivity[:2]]
    floats = {c["name"] for c in report.coverage if "accuracy fallback" in c.get("reason", "")}
    assert floats == set(top)
    plain = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    assert objective(q) < objective(plain)
    paths = report.plot(tmp_path)
    assert any(str(p).endswith("sensitivity.png") for p in paths)
    again = esc.load(model, esc.save(q, tmp_path / "fb.pt"))
    with torch.no_grad():
        assert torch.equal(again(data[0]), q(data[0]))
    drop = esc.quantize(model, esc.QuantConfig(bits=4, method="max", max_drop=0.0), loop, objective,
                        progress=False)
    assert drop.esc_report.objective["fallback_reached"] <= drop.esc_report.objective["fallback_target"] + 1e-12


def test_weight_clip_lowers_the_weight_error_and_reloads(kws, tmp_path):
    model, data, loop, objective = kws
    plain = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    clip = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("weight_clip",)), loop, progress=False)
    for name in ("conv", "fc", "out"):
        w = getattr(model, name).weight
        err = [float(((getattr(q, name).esc_weight() - w) ** 2).sum()) for q in (plain, clip)]
        assert err[1] < err[0]
    ratios = clip.esc_state["transforms"][0]["state"]["ratios"]
    assert "mha:in_proj_weight" in ratios and all(0.3 <= r <= 1 for r in ratios.values())  # functional too
    again = esc.load(model, esc.save(clip, tmp_path / "wc.pt"))
    with torch.no_grad():
        assert torch.equal(again(data[0]), clip(data[0]))


def test_smoothquant_leaves_tied_weights_alone():
    class Tied(nn.Module):  # a vocabulary projection tied to the embedding, as in Whisper
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.head = nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            return self.head(self.norm(self.emb(tokens)))

    torch.manual_seed(0)
    model = Tied().eval()
    tokens = torch.randint(0, 10, (4, 6))
    q = esc.quantize(model, esc.QuantConfig(method="max", ptq=("smoothquant",)), lambda m: m(tokens),
                     progress=False)
    assert torch.equal(q.emb.weight, model.emb.weight)  # the embedding table is not rescaled
    assert not torch.equal(q.head.weight, model.head.weight)


def test_smoothquant_auto_alpha_is_chosen_per_site(tmp_path):
    """α from the grid per site, by each site's quantized output error: the outlier-input site gets
    migration, and the whole model is no worse than with one fixed α."""
    from esc_plugin.core.transforms.smoothquant import AUTO_ALPHAS

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    scale = torch.ones(16)
    scale[3] = 80.0  # an outlier input channel
    data = [torch.randn(32, 16) * scale for _ in range(4)]
    loop, error = loop_and_output_error(model, data)

    cfg = dict(method="max", bits=4, ptq=("smoothquant",))
    auto = esc.quantize(model, esc.QuantConfig(**cfg, smoothquant_alpha="auto"), loop, progress=False)
    fixed = esc.quantize(model, esc.QuantConfig(**cfg, smoothquant_alpha=0.5), loop, progress=False)
    alphas = next(t for t in auto.esc_state["transforms"] if t["name"] == "smoothquant")["state"]["alphas"]
    assert set(alphas) == {"0", "2"} and set(alphas.values()) <= set(AUTO_ALPHAS) and alphas["0"] > 0
    assert any("alpha per site" in n for n in auto.esc_report.notes)
    assert error(auto) <= error(fixed)
    again = esc.load(model, esc.save(auto, tmp_path / "auto.pt"))
    with torch.no_grad():
        assert torch.equal(again(data[1]), auto(data[1]))
    with pytest.raises(ConfigError, match="'auto'"):
        esc.QuantConfig(smoothquant_alpha="best")
    # conv sites: the α search runs the float conv (the quantized module's own forward quantizes)
    conv = nn.Sequential(nn.Conv1d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 1)).eval()
    xs = [torch.randn(2, 16, 20) * scale.view(1, -1, 1) for _ in range(2)]
    q = esc.quantize(conv, esc.QuantConfig(**cfg, smoothquant_alpha="auto"), lambda m: [m(x) for x in xs],
                     progress=False)
    assert set(next(t for t in q.esc_state["transforms"])["state"]["alphas"]) == {"0", "2"}
