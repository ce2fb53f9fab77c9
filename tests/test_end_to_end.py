"""End to end on real models and real audio: honk res8-narrow, Whisper tiny.en,
the built-in demo, and the CLI."""
import json
import subprocess
import sys

import torch

import esc_plugin as esc
from esc_plugin.runner import quantize_task
from esc_plugin.tasks import get_task


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "esc_plugin.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "run" in out.stdout


def test_cli_rejects_unknown_method():
    out = subprocess.run([sys.executable, "-m", "esc_plugin.cli", "run", "--task", "demo", "--method", "minmax"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_demo_task_quantize_writes_report_plots_and_state(tmp_path):
    task = get_task("demo", n_calib=20, n_eval=80, n_train=160, epochs=2)
    qmodel, metrics, _ = quantize_task(task, esc.QuantConfig(bits=4, budget=8), tmp_path, progress=False)
    for name in ("report.json", "amax.png", "convergence.png", "quantized.pt", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["method"] == "esc" and len(report["history"]) == 8
    # nn.MultiheadAttention's projections (F.linear on raw parameters) are quantized
    assert any(c["name"] == "attn.in_proj_weight" and c["quantized"] for c in report["coverage"])
    restored = esc.load(task.model, tmp_path / "quantized.pt")
    assert task.evaluate(restored) == metrics


def test_honk_res8_narrow_w8a8_esc(shared):
    task = get_task("honk", shared_root=shared, n_calib=30, eval_limit=300)
    fp32 = task.evaluate(task.model)["accuracy"]
    q_max = esc.quantize(task.model, esc.QuantConfig(bits=8, method="max"), task.forward_loop, progress=False)
    q_esc = esc.quantize(task.model, esc.QuantConfig(bits=8, method="esc", budget=20), task.forward_loop,
                         task.objective, progress=False)
    assert task.objective(q_esc) <= task.objective(q_max)
    assert task.evaluate(q_esc)["accuracy"] >= fp32 - 5.0
    floats = {c["name"]: c["reason"] for c in q_esc.esc_report.float_ops}
    assert "BatchNorm" in floats["bn1"]
    assert {c["name"] for c in q_esc.esc_report.quantized_ops} >= {"conv0", "conv6", "output"}


def test_whisper_tiny_quantized_covers_encoder_and_decoder(shared):
    task = get_task("whisper", shared_root=shared, n_calib=2, decode_threads=1)
    q = esc.quantize(task.model, esc.QuantConfig(bits=8, method="max"), task.forward_loop, progress=False)
    quantized = {c["name"] for c in q.esc_report.quantized_ops}
    assert {"model.encoder.conv1", "model.encoder.conv2", "model.encoder.layers.0.self_attn.q_proj",
            "model.decoder.layers.3.encoder_attn.v_proj", "model.decoder.layer_norm", "proj_out"} <= quantized
    floats = {c["name"]: c["reason"] for c in q.esc_report.float_ops}
    assert "lookup" in floats["model.decoder.embed_tokens"]
    assert any("attention" in r or "activation x activation" in r for r in floats.values())
    # the FP32 model still transcribes as before; the quantized copy runs through the decoder
    with torch.no_grad():
        assert isinstance(task.objective(q), float)


def _toy_task():
    from esc_plugin.tasks import Task

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 8) for _ in range(2)]
    ref = [model(x).detach() for x in data]

    def err(m):
        with torch.no_grad():
            return float(sum((m(x) - r).pow(2).mean() for x, r in zip(data, ref)))

    calls = []
    task = Task(name="toy", model=model, forward_loop=lambda m: [m(x) for x in data], objective=err,
                evaluate=lambda m: calls.append(1) or {"err": err(m)}, metric="err", higher_is_better=False)
    return task, calls


def test_run_table_names_rows_by_preset_and_counts_real_evaluations(tmp_path):
    import re

    import pytest

    from esc_plugin.runner import markdown_table, run_table

    task, calls = _toy_task()
    with pytest.raises(esc.ConfigError, match="budget=0"):
        run_table(task, [8], ["max", "esc"], str(tmp_path), progress=False, budget=0)
    assert calls == [] and not (tmp_path / "results.json").exists()  # checked before any model run

    rows = run_table(task, [8], ["esc", "esc_initbest"], str(tmp_path), progress=False, budget=5,
                     command=["table", "--x"])
    assert [r["method"] for r in rows] == ["-", "esc", "esc_initbest"]
    for r in rows[1:]:
        t = r["timings"]
        assert t["n_evaluations"] >= 1 and "overhead_vs_budget_evals" not in t
        assert t["overhead_vs_evaluations"] == pytest.approx(
            r["seconds"] / (t["n_evaluations"] * t["seconds_per_evaluation"]))
        assert (tmp_path / f"w8a8_{r['method']}" / "report.json").exists()
    init = json.loads((tmp_path / "w8a8_esc_initbest" / "report.json").read_text())["config"]
    assert init["method"] == "esc" and init["init"] == "best"
    md = markdown_table(task, rows)
    assert re.search(r"× its \d+ evals", md) and "Γ" not in md
    results = json.loads((tmp_path / "results.json").read_text())
    prov = results["provenance"]
    assert prov["command"] == ["table", "--x"] and prov["dirty"] in (True, False, None)
    assert prov["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
    assert "command: `table --x`" in (tmp_path / "results.md").read_text()


def test_table1_maps_the_old_esc_best_spelling(capsys):
    table1 = _load_benchmark("table1")
    assert table1.resolve_methods(["max", "esc+best", "esc_initbest"]) == ["max", "esc_initbest"]
    assert "deprecated" in capsys.readouterr().out
    import pytest

    with pytest.raises(SystemExit, match="minmax"):
        table1.resolve_methods(["minmax"])


FAKE_RECIPE = '''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[2:])
block = args["quantization"].strip("{}")
opts = dict(kv.split(": ") for kv in block.split(", "))
tag = args["quantize"] + ("_initbest" if opts.get("init") == "best" else "") + \\
    ("_loss" if opts.get("metric") == "loss" else "")
folder = os.path.join(args["output_folder"], "quantized", f"{tag}_w{opts['bits']}a{opts['bits']}")
os.makedirs(folder, exist_ok=True)
if args["quantize"] == "nncf":
    sys.exit("this fake recipe cannot run the peer")
json.dump({"fp32": {"error": float(os.environ.get("FAKE_FP32", "0.1"))}, "quantized": {"error": 0.2 if tag == "max" else 0.15},
           "calibration_objective": {"fp32": 0.1, "quantized": 0.12}, "seconds": 1.0},
          open(os.path.join(folder, "metrics.json"), "w"))
'''


def _load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sb_table1_rows_from_presets_with_provenance(tmp_path):
    sb_table1 = _load_benchmark("sb_table1")
    assert sb_table1.recipe_options("esc_paper") == ("esc", {"init": "output_mse", "sigma0": 0.1})
    assert sb_table1.recipe_options("esc_paper_loss") == ("esc", {"init": "output_mse", "sigma0": 0.1,
                                                                  "metric": "loss"})
    assert sb_table1.recipe_options("esc_distill") == ("esc", {"objective": "distill"})
    assert sb_table1.recipe_options("mse") == ("mse", {})
    train = tmp_path / "recipe" / "train.py"
    train.parent.mkdir()
    train.write_text(FAKE_RECIPE)
    out = tmp_path / "out"
    sb_table1.main([str(train), "hp.yaml", "--out", str(out), "--bits", "4",
                    "--methods", "max", "esc_initbest", "esc_loss"])
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["-", "max", "esc_initbest", "esc_loss"]
    prov = results["provenance"]
    assert prov["command"][0] == "benchmarks/sb_table1.py" and "esc_initbest" in prov["command"]
    assert all(r["provenance"] == prov for r in results["rows"] if r["config"] != "FP32")
    assert "Rows from commit(s): " in (out / "results.md").read_text()
    # rows written before the ESC defaults changed are read under today's names
    old = [{"config": "W4A4", "method": m, "metrics": {}} for m in ("esc", "esc_recommended", "max")]
    assert [r["method"] for r in sb_table1.rename_rows(old)] == ["esc_paper", "esc", "max"]
    assert sb_table1.rename_rows(sb_table1.rename_rows(old)) == sb_table1.rename_rows(old)  # once only


def test_sb_table1_marks_failed_rows_and_drops_rows_of_an_earlier_model(tmp_path, monkeypatch):
    sb_table1 = _load_benchmark("sb_table1")
    train = tmp_path / "recipe" / "train.py"
    train.parent.mkdir()
    train.write_text(FAKE_RECIPE)
    out = tmp_path / "out"
    sb_table1.main([str(train), "hp.yaml", "--out", str(out), "--bits", "4", "--methods", "max"])
    sb_table1.main([str(train), "hp.yaml", "--out", str(out), "--bits", "8", "--methods", "nncf", "max"])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["config"], r["method"], bool(r.get("failed"))) for r in rows] == [
        ("FP32", "-", False), ("W8A8", "max", False), ("W8A8", "nncf", True), ("W4A4", "max", False)]
    assert "| W8A8 | nncf | failed: recipe failed (exit 1); see recipe.log |" in (out / "results.md").read_text()

    monkeypatch.setenv("FAKE_FP32", "0.3")  # the recipe retrained: another FP32 model
    sb_table1.main([str(train), "hp.yaml", "--out", str(out), "--bits", "8", "--methods", "max"])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["config"], r["method"]) for r in rows] == [("FP32", "-"), ("W8A8", "max"), ("W8A8", "nncf")]
    assert rows[0]["metrics"] == {"error": 0.3} and rows[1]["fp32"] == {"error": 0.3}
    md = (out / "results.md").read_text()  # the commands of the dropped rows go with them
    assert md.count("`python benchmarks/sb_table1.py") == 1 and "--methods max`" in md
