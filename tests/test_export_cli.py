"""``esc-quantize export`` and ``esc-quantize run --export``, in-process, on a small Conv1d +
LayerNorm + Linear task (real torch / modelopt / ONNX Runtime / OpenVINO objects).

Tolerances: the artifact vs the fake-quantized PyTorch model, on the calibration inputs, relative
L2 <= 1e-2 (ONNX Runtime and OpenVINO, int8 QDQ; QuantizeLinear's [-128, 127] range vs the
simulation's [-127, 127] and the runtimes' own rounding of the int8 inputs are the only
differences) and <= 1e-5 for ``--mode simulation`` (float ops only).
"""
import hashlib
import json
import os
import re
import sys
import tarfile
import textwrap

import pytest

from conftest import fails_fast as _fails_fast, int8_parity
from esc_plugin import cli

TASK_MODULE = "export_cli_task"
TASK = f"{TASK_MODULE}:build"
TASK_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from esc_plugin.tasks import Task

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(20, 16, 3, padding=1)
            self.norm = nn.LayerNorm(16)
            self.ffn = nn.Linear(16, 16)
            self.head = nn.Linear(16, 5)

        def forward(self, feats):  # (batch, time, 20)
            h = torch.relu(self.conv(feats.transpose(1, 2))).transpose(1, 2)
            h = h + torch.relu(self.ffn(self.norm(h)))
            return self.head(h.mean(1))

    def build():
        torch.manual_seed(0)
        model = Tiny().eval()
        calib = [torch.randn(8, 30, 20) * 2 for _ in range(2)]
        x_eval = torch.randn(40, 30, 20) * 2
        with torch.no_grad():
            y_eval = model(x_eval).argmax(1)
            ref = [model(x) for x in calib]

        def objective(m):
            with torch.no_grad():
                return float(sum((m(x) - r).pow(2).mean() for x, r in zip(calib, ref)))

        def evaluate(m):
            with torch.no_grad():
                acc = float((m(x_eval).argmax(1) == y_eval).float().mean()) * 100
            return {"accuracy": acc, "n": 40}

        return Task("tiny-export", model, lambda m: [m(x) for x in calib], objective, evaluate,
                    "accuracy", True, {"n_calib": 16})
''')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A W8A8 run exported in one go (``run --export qdq-onnx``) and a W4A4 run, both with ``max``."""
    root = tmp_path_factory.mktemp("export_cli")
    (root / f"{TASK_MODULE}.py").write_text(TASK_SOURCE)
    sys.path.insert(0, str(root))
    try:
        w8, w4 = root / "w8", root / "w4"
        import io
        from contextlib import redirect_stdout
        printed = io.StringIO()
        with redirect_stdout(printed):
            assert cli.main(["run", "--task", TASK, "--method", "max", "--out", str(w8), "--no-progress",
                             "--export", "qdq-onnx"]) == 0
            assert cli.main(["run", "--task", TASK, "--method", "max", "--bits", "4", "--out", str(w4),
                             "--no-progress"]) == 0
        yield {"root": root, "w8": w8, "w4": w4, "printed": printed.getvalue()}
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(TASK_MODULE, None)


@pytest.fixture
def no_task_building(monkeypatch):
    """Fail the test if the export gets as far as building a task."""
    import esc_plugin.tasks

    def refuse(*a, **k):
        raise AssertionError("the task was built before the bad input was reported")

    monkeypatch.setattr(esc_plugin.tasks, "get_task", refuse)


def rel_l2(printed):
    return float(re.search(r"relative L2 ([0-9.e+-]+)", printed).group(1))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fails_fast(argv, capsys, match):
    # export checks read the quantized file first: a looser limit than the run/demo checks
    return _fails_fast(argv, capsys, match, limit=5.0)


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")]




def test_cli_choices_are_the_export_modules():
    from esc_plugin.export import MODES
    from esc_plugin.export.artifacts import FORMATS

    assert cli.FORMATS == FORMATS and cli.MODES == MODES
    help_text = cli.build_parser().format_help()
    assert "export" in help_text


def test_run_export_writes_the_task_file_and_a_checked_onnx(runs):
    w8, printed = runs["w8"], runs["printed"]
    assert json.loads((w8 / "task.json").read_text()) == {"format": "esc_plugin.task/1", "task": TASK,
                                                          "kwargs": {}}
    from esc_plugin.export import count_qdq, export_metadata

    assert count_qdq(str(w8 / "model.onnx"))["QuantizeLinear"] == 4  # conv, norm, ffn, head inputs
    assert export_metadata(str(w8 / "model.onnx"))["mode"] == "qdq"
    if int8_parity(rel_l2(printed), 1e-2, "ONNX Runtime artifact"):
        assert "no VNNI" not in printed
    else:  # the check tells the machine's kernels from the file: the graph itself agrees
        literal = re.search(r"literal Q/DQ\) agrees to relative L2 ([0-9.e+-]+)", printed)
        assert "This CPU has no VNNI / AMX" in printed and float(literal.group(1)) <= 1e-2
    assert "top-1 agreement" in printed and "ONNX Runtime integer kernels:" in printed
    assert re.search(r"tiny-export: artifact accuracy=\d", printed)
    assert not leftovers(w8)


def test_export_openvino_check_reports_int8_kernels(runs, capsys):
    w8 = runs["w8"]
    state = sha256(w8 / "quantized.pt")
    assert cli.main(["export", str(w8), "--task", TASK, "--format", "openvino", "--check", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (w8 / "model.xml").is_file() and (w8 / "model.bin").is_file()
    assert not (w8 / "model_openvino.onnx").exists() and not leftovers(w8)
    exact = int8_parity(rel_l2(printed), 1e-2, "OpenVINO artifact")
    assert "OpenVINO execution graph: Convolution 1 int8 / 0 float, FullyConnected 2 int8 / 0 float" in printed
    assert re.search(r"artifact accuracy=(9\d|100)\.", printed) or not exact
    from esc_plugin.export.openvino import OpenVinoRunner, runs_int8

    runner = OpenVinoRunner(str(w8 / "model.xml"))
    assert runs_int8(runner, require="all")
    # probed on calibration batches: this graph compiles right, so no fusion barrier was added
    assert runner.fusion_barriers == [] and "fused" not in printed and "warning" not in printed
    assert sha256(w8 / "quantized.pt") == state  # the source is only read


def test_tensorrt_says_it_is_missing_and_prints_trtexec(runs, capsys):
    from esc_plugin.export.artifacts import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here: the engine is built instead")
    out = runs["root"] / "trt" / "tiny.engine"
    assert cli.main(["export", str(runs["w8"]), "--task", TASK, "--format", "tensorrt", "--out", str(out),
                     "--no-progress"]) == 3
    printed = capsys.readouterr().out
    onnx_path = out.with_suffix(".onnx")
    assert onnx_path.is_file() and not out.exists()
    assert "TensorRT engine not built: TensorRT is not installed" in printed
    assert (f"trtexec --onnx={onnx_path} --stronglyTyped --saveEngine={out} --minShapes=feats:1x30x20 "
            "--optShapes=feats:8x30x20 --maxShapes=feats:16x30x20") in printed


def test_w4a4_exports_as_simulation_with_exact_agreement(runs, capsys):
    out = runs["root"] / "w4_sim.onnx"
    assert cli.main(["export", str(runs["w4"]), "--task", TASK, "--mode", "simulation", "--out", str(out),
                     "--check", "--no-progress"]) == 0
    assert rel_l2(capsys.readouterr().out) <= 1e-5


def test_existing_output_needs_overwrite(runs, capsys):
    onnx_path = runs["w8"] / "model.onnx"
    before = sha256(onnx_path), os.stat(onnx_path).st_mtime_ns
    fails_fast(["export", str(runs["w8"]), "--task", TASK], capsys, r"model\.onnx already exists: pass --overwrite")
    assert (sha256(onnx_path), os.stat(onnx_path).st_mtime_ns) == before
    assert cli.main(["export", str(runs["w8"]), "--task", TASK, "--overwrite", "--no-progress"]) == 0
    assert os.stat(onnx_path).st_mtime_ns != before[1] and not leftovers(runs["w8"])


def test_bad_input_fails_before_any_work(runs, tmp_path, capsys, monkeypatch, no_task_building):
    w8, w4 = str(runs["w8"]), str(runs["w4"])
    fails_fast(["export", str(tmp_path / "nowhere")], capsys, r"does not exist: give the --out folder")
    fails_fast(["export", os.path.join(w8, "metrics.json")], capsys, r"is not a quantized result")
    # a task.json may only name a registered task: a builder named in a file is never imported
    fails_fast(["export", w8, "--out", str(tmp_path / "m.onnx")], capsys,
               rf"names the task '{TASK}', which is not a registered task .* pass --task")
    err = fails_fast(["export", w4, "--task", TASK, "--out", str(tmp_path / "m.onnx")], capsys, r"W4A4")
    assert "--format qdq-onnx --mode simulation" in err and "--mode weight_only" in err
    fails_fast(["export", w4, "--task", TASK, "--format", "openvino", "--out", str(tmp_path / "m.xml")], capsys,
               r"4-bit activations have no int8 kernels")
    fails_fast(["export", w8, "--task", TASK, "--out", os.path.join(w8, "quantized.pt")], capsys,
               r"a qdq-onnx artifact is a \.onnx file")
    fails_fast(["export", w8, "--task", TASK, "--format", "openvino", "--out", str(tmp_path / "m.onnx")], capsys,
               r"a openvino artifact is a \.xml file")
    fails_fast(["export", w8, "--task", TASK, "--format", "onnx"], capsys, r"invalid choice: 'onnx'")
    fails_fast(["export", w8, "--task", TASK, "--format", "tensorrt", "--mode", "simulation"], capsys,
               r"TensorRT engine is built from the int8 QDQ graph only")
    fails_fast(["export", w8, "--task", TASK, "--max-audio-seconds", "2"], capsys,
               r"for a \.nemo source \(the Conformer's positional table\)")
    # no task.json: an older run folder, and a SpeechBrain stage folder (quantized.pt + checkpoint/)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "quantized.pt").write_bytes((runs["w8"] / "quantized.pt").read_bytes())
    fails_fast(["export", str(bare)], capsys, r"has no task\.json .* --task honk")
    (bare / "checkpoint").mkdir()
    fails_fast(["export", str(bare)], capsys, r"SpeechBrain stage folder: .*load_quantized")
    # an FP32 .nemo (NeMo's tar, no esc_plugin state inside)
    fp32_nemo = tmp_path / "fp32.nemo"
    (tmp_path / "model_config.yaml").write_text("target: x\n")
    with tarfile.open(fp32_nemo, "w") as tar:
        tar.add(tmp_path / "model_config.yaml", arcname="./model_config.yaml")
    fails_fast(["export", str(fp32_nemo)], capsys, r"is an FP32 \.nemo")
    # a missing runtime names the extra to install
    monkeypatch.setitem(sys.modules, "openvino", None)
    fails_fast(["export", w8, "--task", TASK, "--format", "openvino", "--out", str(tmp_path / "m.xml")], capsys,
               r'needs openvino, which is not installed: pip install -e "\.\[openvino\]"')
    assert not list(tmp_path.glob("m.*"))


def test_run_export_options_are_checked_before_quantizing(runs, tmp_path, capsys, no_task_building):
    sys.path.insert(0, str(runs["root"]))
    try:
        fails_fast(["run", "--task", TASK, "--export", "qdq-onnx"], capsys, r"--export needs --out")
        err = fails_fast(["run", "--task", TASK, "--bits", "4", "--out", str(tmp_path / "r"), "--export",
                          "openvino"], capsys, r"W4A4")
        assert "--mode simulation" in err
        fails_fast(["run", "--task", TASK, "--out", str(tmp_path / "r"), "--overwrite"], capsys,
                   r"--overwrite applies to --export")
        fails_fast(["run", "--task", TASK, "--out", str(runs["w8"]), "--export", "qdq-onnx"], capsys,
                   r"already exists: pass --overwrite")
    finally:
        sys.path.remove(str(runs["root"]))
