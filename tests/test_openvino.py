"""OpenVINO runtime backend on real OpenVINO objects: the QDQ ONNX read and compiled for CPU,
its execution graph inspected for int8 kernels (not assumed), parity with the simulation.

Stated tolerance: OpenVINO vs the fake-quantized PyTorch model, relative L2 <= 1e-2 and equal
top-1 classes (the int8 products are exact int32; QuantizeLinear's [-128, 127] range vs the
simulation's [-127, 127] and OpenVINO's own rounding of its u8-shifted inputs differ).
"""
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import esc_plugin as esc  # noqa: E402
from conftest import int8_parity, needs_exact_int8  # noqa: E402
from esc_plugin.export import ExportError, export_qdq_onnx  # noqa: E402
from esc_plugin.export.artifacts import write_openvino_ir  # noqa: E402
from esc_plugin.export.openvino import (OpenVinoRunner, int8_compute_ops, runs_int8,  # noqa: E402
                                        runtime_precisions)
from esc_plugin.tasks.demo import DemoKWS, make_split  # noqa: E402

TOLERANCE = 1e-2


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo task's Conv1d + LayerNorm + self-attention + Linear model on its synthesised
    log-mel features (untrained weights, seeded), W8A8 ``max``, exported as QDQ ONNX."""
    tmp = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    feats, _ = make_split(40, seed=7)
    model = DemoKWS().eval()

    def loop(m):
        for xb in feats[:24].split(12):
            m(xb)

    qmodel = esc.quantize(model, esc.QuantConfig(bits=8, method="max"), loop, progress=False)
    path = str(tmp / "demo_w8a8.onnx")
    export_qdq_onnx(qmodel, feats[:12], path, ["feats"], ["logits"],
                    dynamic_axes={"feats": {0: "batch"}, "logits": {0: "batch"}})
    return {"tmp": tmp, "feats": feats, "model": model, "qmodel": qmodel, "path": path}


def test_parity_with_the_simulation_at_another_batch_size(demo):
    runner = OpenVinoRunner(demo["path"])
    x = demo["feats"][24:]  # 16 clips not used for calibration; the export example had 12
    with torch.no_grad():
        ref = demo["qmodel"](x).numpy()
    got, = runner(x)
    assert got.shape == ref.shape and got.dtype == np.float32
    if int8_parity(rel_l2(got, ref), TOLERANCE, "OpenVINO"):
        assert (got.argmax(1) == ref.argmax(1)).all()
    # numpy and torch inputs alike; outputs are copies (the next call does not overwrite them)
    again, = runner(x.numpy())
    runner(demo["feats"][:3])
    np.testing.assert_array_equal(again, got)


def test_execution_graph_runs_convolutions_and_matmuls_in_int8(demo):
    runner = OpenVinoRunner(demo["path"])
    precisions = runtime_precisions(runner)
    assert set(precisions["Convolution"]) <= {"u8", "i8"}
    ops = int8_compute_ops(runner.compiled)  # a CompiledModel works as well as the runner
    # conv; the attention's in-projection (3 call sites) and out-projection, ffn (2), head
    assert ops["Convolution"] == {"int8": 1, "float": 0}
    assert ops["FullyConnected"]["float"] == 0 and ops["FullyConnected"]["int8"] >= 4
    assert runs_int8(runner, require="all")
    assert precisions["FakeQuantize"]  # the activations' Q/DQ pairs became FakeQuantize layers


def test_a_float_graph_is_reported_as_float(demo):
    """The same model exported with ``mode="simulation"`` (the fake quantization as float ops, no
    Q/DQ pair): nothing may be reported as int8, and it computes the simulation."""
    path = str(demo["tmp"] / "demo_simulation.onnx")
    export_qdq_onnx(demo["qmodel"], demo["feats"][:12], path, ["feats"], ["logits"],
                    dynamic_axes={"feats": {0: "batch"}, "logits": {0: "batch"}}, mode="simulation")
    runner = OpenVinoRunner(path)
    assert not runs_int8(runner)
    assert all(c["int8"] == 0 for c in int8_compute_ops(runner).values())
    assert "FakeQuantize" not in runtime_precisions(runner)
    with torch.no_grad():
        ref = demo["qmodel"](demo["feats"][24:]).numpy()
    assert rel_l2(runner(demo["feats"][24:])[0], ref) <= 1e-5


def test_ir_written_from_the_onnx_computes_the_same(demo):
    xml = str(demo["tmp"] / "ir" / "model.xml")
    os.makedirs(os.path.dirname(xml))
    write_openvino_ir(demo["path"], xml)
    assert sorted(os.listdir(os.path.dirname(xml))) == ["model.bin", "model.xml"]
    x = demo["feats"][24:]
    from_ir, = OpenVinoRunner(xml)(x)
    from_onnx, = OpenVinoRunner(demo["path"])(x)
    np.testing.assert_allclose(from_ir, from_onnx, rtol=0, atol=1e-6)
    assert runs_int8(OpenVinoRunner(xml), require="all")


def test_bad_input_is_refused_with_the_fix(demo, tmp_path, monkeypatch):
    runner = OpenVinoRunner(demo["path"], threads=2, precision=None)
    with pytest.raises(ExportError, match=r"takes 1 inputs \['feats'\], got 2"):
        runner(demo["feats"][:2], demo["feats"][:2])
    with pytest.raises(ExportError, match="does not exist: export it first"):
        OpenVinoRunner(str(tmp_path / "missing.onnx"))
    with pytest.raises(ExportError, match="threads=0"):
        OpenVinoRunner(demo["path"], threads=0)
    with pytest.raises(ExportError, match="precision='int8'"):
        OpenVinoRunner(demo["path"], precision="int8")
    with pytest.raises(ExportError, match="device 'NPU9' is not available"):
        OpenVinoRunner(demo["path"], device="NPU9")
    with pytest.raises(ExportError, match="expected an OpenVinoRunner"):
        runtime_precisions(demo["path"])
    with pytest.raises(ExportError, match="require='most'"):
        runs_int8(runner, require="most")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ExportError, match=r'pip install -e "\.\[openvino\]"'):
        OpenVinoRunner(demo["path"])


@pytest.fixture(scope="module")
def honk(tmp_path_factory):
    """Real honk res8 weights and MFCC features, W8A8 ``max``, exported as QDQ ONNX."""
    from conftest import honk_task
    from esc_plugin.export.check import capture_inputs

    task = honk_task(n_calib=20, eval_limit=20)
    qmodel = esc.quantize(task.model, esc.QuantConfig(bits=8, method="max"), task.forward_loop, progress=False)
    x, = capture_inputs(qmodel, task.forward_loop)[0]
    path = str(tmp_path_factory.mktemp("honk_ov") / "honk.onnx")
    export_qdq_onnx(qmodel, x, path, ["feats"], ["logits"])
    with torch.no_grad():
        ref = qmodel(x).numpy()
    return {"path": path, "x": x, "ref": ref}


def test_honk_res8_parity(honk):
    """OpenVINO 2026.4.1's CPU plugin gets this int8 graph wrong at its end: the last BatchNorm
    (per channel, before ``flatten -> mean``) disappears from the execution graph (no layer lists
    ``/bn6/`` among its original layers: it is folded into the following FakeQuantize, which is
    fused into ``ReduceMean``), and the pooled features come out wrong. Cut just before
    ``ReduceMean`` the graph agrees with ONNX Runtime; the FP32 graph runs correctly; ONNX Runtime
    runs the same file correctly. Kept as an expected failure, so that a fixed OpenVINO shows up
    as XPASS; ``test_fusion_barriers_fix_honk_res8`` is the workaround the export ships."""
    runner = OpenVinoRunner(honk["path"])
    assert int8_compute_ops(runner)["Convolution"] == {"int8": 7, "float": 0}
    if rel_l2(runner(honk["x"])[0], honk["ref"]) > TOLERANCE:
        layers = [n.get_rt_info()["originalLayersNames"].astype(str)
                  for n in runner.compiled.get_runtime_model().get_ordered_ops()]
        assert not any("/bn6/" in names for names in layers)  # the known cause, not another one
        pytest.xfail("OpenVINO 2026.4.1 CPU: the last BatchNorm folded into the FakeQuantize fused "
                     "into ReduceMean gives wrong outputs (see the docstring)")


@needs_exact_int8  # the probe compares with ONNX Runtime's literal run: saturating kernels differ everywhere
def test_fusion_barriers_fix_honk_res8(honk, tmp_path):
    """The quantizer after ``ReduceMean`` kept unfused (its input an extra output) is all it takes:
    found by bisection against ONNX Runtime's literal Q/DQ run, stored in the IR, and the runner
    returns the model's own output only, within the stated tolerance of the simulation."""
    from esc_plugin.export.openvino_barriers import find_fusion_barriers

    x, ref = honk["x"], honk["ref"]
    raw = rel_l2(OpenVinoRunner(honk["path"])(x)[0], ref)
    found = find_fusion_barriers(honk["path"], [(x,)])
    if raw <= TOLERANCE:  # a fixed OpenVINO: nothing to work around
        assert found["barriers"] == [] and found["agrees"]
        return
    assert found["barriers"] == ["/ReduceMean_output_0"] and found["agrees"]
    assert found["fixed_distance"] < found["distance"] / 10
    runner = OpenVinoRunner(honk["path"], fusion_barriers=found["barriers"])
    out = runner(x)
    assert len(out) == 1 and runner.output_names == ["logits"]
    assert rel_l2(out[0], ref) <= TOLERANCE and (out[0].argmax(1) == ref.argmax(1)).all()
    assert runs_int8(runner, require="all")
    xml = str(tmp_path / "honk.xml")
    assert write_openvino_ir(honk["path"], xml, [(x,)])["barriers"] == found["barriers"]
    from_ir = OpenVinoRunner(xml)
    assert from_ir.fusion_barriers == found["barriers"] and from_ir.output_names == ["logits"]
    np.testing.assert_allclose(from_ir(x)[0], out[0], rtol=0, atol=1e-6)
    with pytest.raises(ExportError, match="already outputs of the model"):
        OpenVinoRunner(honk["path"], fusion_barriers=["logits"])
