"""benchmarks/table2.py (paper Table 2: ESC alone vs ESC + each PTQ pass) on a toy in-process task."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from esc_plugin.core.errors import CalibrationError
from esc_plugin.core.registry import transform_names

# A task module of Linear layers only: bias_correction applies, hyq (convolution inputs) cannot.
TOY_TASK = '''
import torch
from esc_plugin.tasks import Task

BUILT = []


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 8) for _ in range(2)]
    test = [torch.randn(4, 8) for _ in range(2)]
    with torch.no_grad():
        ref, ref_test = [model(x) for x in data], [model(x) for x in test]

    def err(m, xs=data, refs=ref):
        with torch.no_grad():
            return float(sum((m(x) - r).pow(2).mean() for x, r in zip(xs, refs)))

    BUILT.append(model)
    return Task(name="toy", model=model, forward_loop=lambda m: [m(x) for x in data], objective=err,
                evaluate=lambda m: {"err": err(m, test, ref_test)}, metric="err", higher_is_better=False)
'''


def _benchmark(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table2():
    return _benchmark("table2")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_table2_task.py").write_text(TOY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_table2_task", None)
    import toy_table2_task

    return toy_table2_task


def test_bad_pass_refused_before_any_work_naming_the_registry(tmp_path, toy):
    table2 = _table2()
    out = tmp_path / "out"
    for bad in (["--passes", "adarond"], ["--combos", "smoothquant+nope"]):
        with pytest.raises(SystemExit) as e:
            table2.main(["--task", "toy_table2_task:build", "--out", str(out), *bad])
        assert "is not a registered pass" in str(e.value)
        assert all(name in str(e.value) for name in transform_names())
    assert toy.BUILT == [] and not out.exists()  # no task built, nothing written
    assert "fallback" not in table2.default_passes() and "adaround" in table2.default_passes()


def test_rows_base_then_passes_not_applicable_and_delta(tmp_path, toy):
    table2 = _table2()
    out = tmp_path / "out"
    common = ["--task", "toy_table2_task:build", "--out", str(out), "--bits", "8", "--budget", "6"]
    assert table2.main(common + ["--passes", "bias_correction", "hyq",
                                 "--combos", "bias_correction+smoothquant"]) == 0
    model = toy.BUILT[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert [r["row"] for r in results["rows"]] == ["FP32", "esc", "esc+bias_correction", "esc+hyq",
                                                   "esc+smoothquant+bias_correction"]
    base, bc, hyq = rows["esc"], rows["esc+bias_correction"], rows["esc+hyq"]
    assert base["status"] == "ok" and base["ptq"] == [] and base["delta"] == 0 and not base["worse"]
    # the pass ran, with its time, and the table compares it to ESC alone in the task's direction (lower err)
    assert [p["name"] for p in bc["ptq"]] == ["bias_correction"] and bc["ptq"][0]["seconds"] > 0
    assert bc["delta"] == pytest.approx(bc["metric"] - base["metric"])
    assert bc["worse"] == (bc["metric"] > base["metric"])
    combo = rows["esc+smoothquant+bias_correction"]
    assert [p["name"] for p in combo["ptq"]] == ["smoothquant", "bias_correction"]  # canonical order
    # a pass that cannot apply to the model is a row saying so, not a crash
    assert hyq["status"].startswith("not applicable: ") and "Conv" in hyq["status"]
    assert hyq["metric"] is None and hyq["delta"] is None and not hyq["worse"]
    md = (out / "results.md").read_text()
    assert "worse than esc alone" in md and "not applicable" in md and "bias_correction " in md
    assert "Command: `python benchmarks/table2.py --task toy_table2_task:build" in md
    assert all(r["provenance"]["command"][0] == "benchmarks/table2.py" for r in results["rows"])

    # a later run re-runs only its rows; the others are kept
    assert table2.main(common + ["--passes", "hyq"]) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["row"] for r in again] == [r["row"] for r in results["rows"]]  # one order, whatever ran last
    assert next(r for r in again if r["row"] == "esc+bias_correction") == bc
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # FP32 model untouched


def test_rows_of_another_fp32_model_are_dropped_on_rerun(tmp_path, toy, capsys):
    """A recipe retrained into the run folder (e.g. on another machine) is another FP32 model: rows
    measured against the earlier one must not sit in the same table as the new ones."""
    table2 = _table2()
    out = tmp_path / "out"
    common = ["--task", "toy_table2_task:build", "--out", str(out), "--bits", "8", "--budget", "6"]
    assert table2.main(common + ["--passes", "bias_correction"]) == 0
    path = out / "results.json"
    results = json.loads(path.read_text())
    fp32 = next(r for r in results["rows"] if r["row"] == "FP32")
    assert table2.main(common + ["--passes"]) == 0  # the same model again: every row kept
    assert [r["row"] for r in json.loads(path.read_text())["rows"]] == ["FP32", "esc", "esc+bias_correction"]
    fp32["metrics"] = {k: v + 1.0 for k, v in fp32["metrics"].items()}  # as if measured on an earlier model
    path.write_text(json.dumps(results))
    assert table2.main(common + ["--passes"]) == 0  # ESC alone only
    rows = json.loads(path.read_text())["rows"]
    assert [r["row"] for r in rows] == ["FP32", "esc"]
    assert rows[0]["metrics"] != fp32["metrics"]
    assert "dropping rows of the earlier model: W8A8 esc+bias_correction" in capsys.readouterr().out


def test_set_rows_are_named_with_their_settings_and_compared_to_their_own_base(tmp_path, toy):
    table2 = _table2()
    out = tmp_path / "out"
    common = ["--task", "toy_table2_task:build", "--out", str(out), "--bits", "8", "--budget", "6"]
    with pytest.raises(SystemExit) as e:  # an unknown option, before any work
        table2.main(common + ["--passes", "bias_correction", "--set", "bias_correction_eror=weight"])
    assert "did you mean 'bias_correction_error'" in str(e.value) and toy.BUILT == [] and not out.exists()
    with pytest.raises(SystemExit, match="bias_correction_error='input': use one of"):
        table2.main(common + ["--passes", "bias_correction", "--set", "bias_correction_error=input"])
    assert table2.main(common + ["--passes", "bias_correction"]) == 0
    assert table2.main(common + ["--passes", "bias_correction", "--set", "bias_correction_error=output"]) == 0
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    tag = "[bias_correction_error=output]"
    assert list(rows) == ["FP32", "esc", "esc" + tag, "esc+bias_correction", "esc+bias_correction" + tag]
    whole, base = rows["esc+bias_correction" + tag], rows["esc" + tag]
    assert whole["delta"] == pytest.approx(whole["metric"] - base["metric"])
    assert any("corrected the output error" in n for n in whole["notes"])
    assert any("corrected the weight error" in n for n in rows["esc+bias_correction"]["notes"])  # the default


def test_seed_summary_groups_a_seed_study_by_its_settings(tmp_path, toy):
    table2, summary = _table2(), _benchmark("seed_summary")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="not found: pass the --out folder"):
        summary.main([str(out)])
    common = ["--task", "toy_table2_task:build", "--out", str(out), "--bits", "8", "--budget", "6", "--passes"]
    for seed in (0, 1):
        assert table2.main(common + ["--set", f"seed={seed}"]) == 0
        assert table2.main(common + ["--set", f"seed={seed}", "sigma0=0.5"]) == 0
    rows = {r["row"]: r["metric"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert summary.main([str(out)]) == 0
    table = (out / "seeds.md").read_text()
    for setting, runs in (("esc", ["esc[seed=0]", "esc[seed=1]"]),
                          ("esc[sigma0=0.5]", ["esc[seed=0,sigma0=0.5]", "esc[seed=1,sigma0=0.5]"])):
        line = next(line for line in table.splitlines() if f"| `{setting}` |" in line)
        values = [rows[r] for r in runs]  # lower is better: worst = max
        assert line.endswith(f"| {sum(values) / 2:.4g} | {max(values):.4g} | {min(values):.4g} |")
    assert "FP32" not in table  # rows without a seed are not a seed study


def test_compare_flags_rows_worse_than_the_base_in_the_metric_direction():
    table2 = _table2()

    def rows():
        return [{"config": "W4A4", "row": "esc", "metric": 80.0}, {"config": "W4A4", "row": "esc+a", "metric": 78.0},
                {"config": "W4A4", "row": "esc+b", "metric": 81.0}, {"config": "W8A8", "row": "esc+a", "metric": 1.0},
                {"config": "FP32", "row": "FP32", "metric": 90.0}]

    up = {r["row"] + r["config"]: r for r in table2.compare(rows(), "esc", higher_is_better=True)}
    assert up["esc+aW4A4"]["delta"] == -2.0 and up["esc+aW4A4"]["worse"]
    assert up["esc+bW4A4"]["delta"] == 1.0 and not up["esc+bW4A4"]["worse"]
    assert up["esc+aW8A8"]["delta"] is None and not up["esc+aW8A8"]["worse"]  # no base at W8A8
    assert up["FP32FP32"]["delta"] is None
    down = {r["row"]: r for r in table2.compare(rows()[:3], "esc", higher_is_better=False)}
    assert not down["esc+a"]["worse"] and down["esc+b"]["worse"]
    # a folder with runs of two --base presets: each row against its own base alone
    mixed = rows()[:3] + [{"config": "W4A4", "row": "esc_paper", "metric": 70.0},
                          {"config": "W4A4", "row": "esc_paper+a", "metric": 75.0}]
    both = {r["row"]: r for r in table2.compare(mixed, "esc_paper", higher_is_better=True)}
    assert both["esc"]["delta"] == 0 and both["esc+a"]["delta"] == -2.0 and both["esc_paper+a"]["delta"] == 5.0
    assert "Δ vs its base alone" in table2.markdown(
        {"base": "esc_paper", "higher_is_better": True, "metric": "accuracy"},
        [dict(r, status="ok", calib_objective=None, seconds=None) for r in both.values()])


def test_a_recipe_error_is_read_from_its_own_run_not_an_earlier_row(tmp_path):
    table2 = _table2()
    log = tmp_path / "recipe.log"
    log.write_text("$ row 1\nesc_plugin.core.errors.ConfigError: ptq=('a',): the earlier row's reason\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("$ row 2\nruamel.yaml.parser.ParserError: while parsing a flow mapping\n")
    assert table2._recipe_error(str(log), start) is None  # not the earlier row's ConfigError
    with open(log, "a") as f:
        f.write("esc_plugin.core.errors.CalibrationError: this row's reason\n")
    error = table2._recipe_error(str(log), start)
    assert isinstance(error, CalibrationError) and str(error) == "this row's reason"
