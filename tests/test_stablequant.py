"""``method="stablequant"`` (issue #11 item 1): StableQuant from its authors' description.

Real torch / modelopt objects and the real honk res8-narrow model; no mocks.
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import esc_plugin as esc
from conftest import loop_and_output_error
from esc_plugin.core.calibrators.stablequant import StableQuantCalibrator
from esc_plugin.core.errors import CalibrationError, ObjectiveError
from esc_plugin.core.registry import get_calibrator, register_calibrator, unregister_calibrator

OUTLIER = "0"  # the Sequential index of the layer whose input carries the outlier


def _outlier_model():
    """fc(8->16) -> ReLU -> fc(16->16) -> ReLU -> fc(16->4); input feature 7 holds one huge value, and the
    first layer ignores that feature, so Max is bad at the first layer's input only (and the histogram,
    2048 bins up to the outlier, still resolves the other values)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[:, 7] = 0.0
    data = [torch.randn(256, 8) for _ in range(2)]
    data[0][3, 7] = 300.0  # one value in 4096: p99.9 clips it, Max spends its 8 bits on it
    return model, data


@pytest.fixture(scope="module")
def outlier():
    model, data = _outlier_model()
    loop, objective = loop_and_output_error(model, data)
    return model, data, loop, objective


def _drops_and_threshold(q):
    state = q.esc_state["calibrator"]["state"]
    return state, q.esc_report.objective["stablequant_threshold"]


def test_registered_after_the_others_with_its_needs():
    names = esc.calibrator_names()
    assert names[:5] == ("max", "percentile", "entropy", "mse", "esc")
    assert names.index("stablequant") == 5
    spec = get_calibrator("stablequant")
    assert spec.objective == "optional" and spec.needs == {"max", "histogram"}
    assert esc.QuantConfig(method="stablequant").method == "stablequant"


def test_flags_exactly_the_layers_over_the_threshold_and_clips_them(outlier):
    model, data, loop, objective = outlier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = esc.quantize(model, esc.QuantConfig(bits=8, method="stablequant"), loop, objective, progress=False)
    state, tau = _drops_and_threshold(q)
    drops = state["drops"]
    assert set(drops) == {l.name for l in q.esc_report.layers}
    assert set(state["flagged"]) == {n for n, d in drops.items() if d > tau}
    assert state["flagged"] == [OUTLIER]  # Max is bad at the outlier's layer only
    r = q.esc_report
    assert tau == pytest.approx(StableQuantCalibrator.threshold
                                * max(abs(r.objective["fp32"]), r.objective["max"] - r.objective["fp32"]))
    layer = {l.name: l for l in r.layers}[OUTLIER]
    assert layer.final < layer.max / 10  # the clip search dropped the outlier
    assert {l.name: l.final for l in r.layers if l.name != OUTLIER} == \
        {l.name: l.max for l in r.layers if l.name != OUTLIER}  # unflagged sites keep Max
    plain = esc.quantize(model, esc.QuantConfig(bits=8, method="max"), loop, progress=False)
    assert objective(q) < objective(plain) / 10
    assert objective(q) == pytest.approx(r.objective["final"])
    # bounded and recorded: FP32 + all-Max + one per site, then at most 5 candidates for the flagged one
    n = int(re.search(r"stablequant: (\d+) objective evaluations", " ".join(r.notes)).group(1))
    assert 2 + len(r.layers) < n <= 2 + len(r.layers) + 5 and n == r.timings["n_evaluations"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # FP32 untouched
    assert not any("quantizer" in n for n, _ in model.named_modules())


def test_a_small_budget_keeps_max_for_the_flagged_sites_it_cannot_search(outlier):
    model, data, loop, objective = outlier
    q = esc.quantize(model, esc.QuantConfig(bits=8, method="stablequant", budget=1), loop, objective,
                     progress=False)
    layer = {l.name: l for l in q.esc_report.layers}[OUTLIER]
    assert layer.final == layer.max
    assert any("budget 1 covers 0 flagged" in n for n in q.esc_report.notes)


def test_without_an_objective_it_uses_distillation_or_the_histograms(outlier):
    model, data, loop, objective = outlier
    q = esc.quantize(model, esc.QuantConfig(bits=8, method="stablequant"), loop, progress=False)
    notes = " ".join(q.esc_report.notes)
    assert "objective: distillation to the FP32 outputs" in notes and "stablequant: " in notes
    assert q.esc_state["calibrator"]["state"]["flagged"][0] == OUTLIER

    # composed from a calibrator that takes no objective: no objective at all reaches stablequant
    @register_calibrator("stablequant_composed_test", needs=("histogram",), summary="test")
    class Composed:
        def __init__(self, config):
            self.config = config

        def calibrate(self, ctx):
            assert not ctx.has_objective
            return ctx.baseline("stablequant")

    try:
        q = esc.quantize(model, esc.QuantConfig(bits=8, method="stablequant_composed_test"), loop,
                         progress=False)
    finally:
        unregister_calibrator("stablequant_composed_test")
    assert any("no objective, so no sensitivity measured" in n for n in q.esc_report.notes)
    # the input-histogram MSE decides: one value of 300 costs more clipped than it costs at Max, so
    # (unlike the objective) it keeps Max at the outlier's layer; every site has Max or its noted clip
    choices = q.esc_report.notes[-1]
    for l in q.esc_report.layers:
        assert l.final == l.max or f"'{l.name}': " in choices
        assert math.isfinite(l.final) and l.final > 0


def test_bad_input_is_refused_and_the_fp32_model_untouched(outlier):
    model, data, loop, objective = outlier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="objective must be a callable"):
        esc.quantize(model, esc.QuantConfig(method="stablequant"), loop, "wer", progress=False)
    with pytest.raises(ObjectiveError, match="NaN or inf on the FP32 model"):
        esc.quantize(model, esc.QuantConfig(method="stablequant"), loop, lambda m: float("nan"),
                     progress=False)
    with pytest.raises(ObjectiveError, match="the objective raised ZeroDivisionError"):
        esc.quantize(model, esc.QuantConfig(method="stablequant"), loop, lambda m: 1 / 0, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def honk():
    from conftest import honk_task

    return honk_task()


def test_honk_res8_narrow_end_to_end(honk, tmp_path):
    before = {k: v.clone() for k, v in honk.model.state_dict().items()}
    config = esc.QuantConfig(bits=4, method="stablequant", selection_split=None, budget=20)
    q = esc.quantize(honk.model, config, honk.forward_loop, honk.objective, progress=False)
    r = q.esc_report
    finals = np.array([l.final for l in r.layers])
    assert len(finals) == len(r.quantized_ops) > 5 and np.all(np.isfinite(finals)) and np.all(finals > 0)
    state, tau = _drops_and_threshold(q)
    assert set(state["flagged"]) == {n for n, d in state["drops"].items() if d > tau} and state["flagged"]
    # greedy, never worse than Max on the objective it searched (the whole calibration objective here)
    assert r.objective["final"] <= r.objective["max"]
    assert math.isclose(float(honk.objective(q)), r.objective["final"], rel_tol=1e-6)
    assert r.timings["n_evaluations"] <= 2 + len(r.layers) + config.budget
    assert all(torch.equal(v, honk.model.state_dict()[k]) for k, v in before.items())
    again = esc.load(honk.model, esc.save(q, tmp_path / "sq.pt"))
    x = torch.randn(2, 101, 40)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
