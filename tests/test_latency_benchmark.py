"""benchmarks/latency.py end to end, in both phases, with 2 repetitions.

Real objects: honk res8-narrow and its Speech Commands MFCCs from ../shared,
esc_plugin + modelopt for the W8A8 QDQ export, ONNX Runtime and PyTorch for the
timing, and a SpeechBrain ConformerEncoder added through the
``--model module:function`` hook (random weights, honk's real MFCCs as input).
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
BACKENDS = {"pytorch_fp32", "ort_fp32", "ort_int8", "ort_int8_weights", "ov_fp32", "ov_int8"}


def _load(name):
    if str(BENCH) not in sys.path:  # latency.py imports latency_models / latency_export by name
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyConformer(nn.Module):
    """(B, 101, 40) MFCC -> Linear -> SpeechBrain ConformerEncoder (RelPosMHAXL) -> mean -> 12 logits."""

    def __init__(self):
        super().__init__()
        from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
        from speechbrain.nnet.attention import RelPosEncXL

        self.inp = nn.Linear(40, 32)
        self.pos = RelPosEncXL(32)
        self.enc = ConformerEncoder(num_layers=1, d_model=32, d_ffn=64, nhead=4, kernel_size=5,
                                    attention_type="RelPosMHAXL", dropout=0.0)
        self.out = nn.Linear(32, 12)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.enc(h, pos_embs=self.pos(h))
        return self.out(h.mean(1))


def tiny_conformer(shared_root):
    """The hook: a builder returning a dict (the documented contract for in-project Conformers)."""
    torch.manual_seed(0)
    honk = _load("latency_models").build_honk(shared_root, n_calib=8)
    return {"name": "tiny_conformer", "model": TinyConformer().eval(), "inputs": honk.inputs,
            "calibration": honk.calibration, "description": "1-layer SpeechBrain Conformer, MFCC 101x40"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    shared = Path(os.environ.get("ESC_SHARED", BENCH.parents[1] / "shared"))
    if not (shared / "data").is_dir():
        pytest.skip(f"real data not found at {shared}: set ESC_SHARED to the shared/ folder")
    root = tmp_path_factory.mktemp("latency")
    latency = _load("latency")
    export = ["--export-only", "--out", str(root / "export"), "--shared", str(shared), "--models", "honk",
              "--model", f"{__name__}:tiny_conformer"]
    assert latency.main(export) == 0
    measure = ["--measure", str(root / "export"), "--results", str(root / "results"), "--shared", str(shared),
               "--repeats", "2", "--warmup", "1", "--profile-runs", "1"]
    threads = torch.get_num_threads()
    assert latency.main(measure) == 0
    assert torch.get_num_threads() == threads  # the benchmark restores torch's thread count
    return {"root": root, "latency": latency, "measure": measure,
            "res": json.loads((root / "results" / "results.json").read_text()),
            "md": (root / "results" / "results.md").read_text()}


def test_rows_cover_every_backend_batch_and_model(run):
    rows = run["res"]["rows"]
    for model in ("honk", "tiny_conformer"):
        for batch in (1, 8):
            got = {r["backend"]: r for r in rows if r["model"] == model and r["batch"] == batch}
            assert BACKENDS <= set(got), (model, batch, sorted(got))
            for r in (got[b] for b in BACKENDS):
                assert r["threads"] == 1 and r["runs"] == 2, r
                assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"], r
            assert got["ort_fp32"]["speedup_vs_fp32"] == 1.0
    assert run["res"]["settings"]["threads"] == [1]


def test_exported_files_sizes_and_outputs(run):
    res = run["res"]
    for name, info in res["models"].items():
        sizes = info["bytes"]
        assert all(n > 0 for n in sizes.values())
        assert sizes["int8_weights"] < sizes["int8_qdq"], sizes  # float weights -> int8 initializers
        assert res["targets"][name]["file_ratio_int8_qdq"] == round(sizes["int8_qdq"] / sizes["fp32"], 3)
        for check in res["output_checks"][name]:
            assert check["ort_fp32_vs_pytorch_fp32"]["rel_l2"] < 1e-4, check
            # the int8-initializer rewrite computes what ORT computes from the Q/DQ graph
            assert check["ort_int8_weights_vs_ort_int8"]["max_abs"] <= 1e-5, check
            assert 0 < check["ort_int8_vs_ort_fp32"]["rel_l2"] < 2, check  # quantized, still sane
    # the Conformer's Linear layers run as ONNX Runtime integer kernels, and the profile sees them
    conformer = res["models"]["tiny_conformer"]["ort_int8_graph"]
    assert conformer["integer_ops"].get("MatMulIntegerToFloat", 0) > 0, conformer
    profile = res["profiles"]["tiny_conformer"]["ort_int8"]
    assert profile["integer_kernel_ms"] > 0 and profile["ops"]["MatMulIntegerToFloat"]["nodes"] > 0
    assert res["profiles"]["honk"]["ort_fp32"]["integer_kernel_ms"] == 0


def test_report_names_command_machine_and_tensorrt(run):
    res, md = run["res"], run["md"]
    assert " ".join(run["measure"]) in res["command"] and res["command"] in md
    assert "--export-only" in res["export_command"] and res["export_command"] in md
    assert res["machine"]["cpu"] in md and res["machine"]["logical_cpus"] >= 1
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert not res["tensorrt"]["available"] and "tensorrt" in res["tensorrt"]["reason"]
        assert "TensorRT: not available" in md
    for heading in ("## honk", "## tiny_conformer", "| 8 | 1 | ORT INT8 (QDQ, int8 weight initializers: esc_plugin default) |"):
        assert heading in md


def test_measure_phase_alone_and_bad_arguments(run):
    latency, root = run["latency"], run["root"]
    out = root / "results_no_torch"
    assert latency.main(["--measure", str(root / "export"), "--models", "honk", "--no-torch",
                         "--results", str(out), "--repeats", "1", "--warmup", "0",
                         "--batch-sizes", "2", "--profile-runs", "0"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"honk"} and {r["batch"] for r in rows} == {2}
    assert next(r for r in rows if r["backend"] == "pytorch_fp32")["skipped"].startswith("disabled")
    with pytest.raises(SystemExit, match="not in"):
        latency.main(["--measure", str(root / "export"), "--models", "whisper_encoder"])
    with pytest.raises(SystemExit):
        latency.main(["--measure", str(root / "export"), "--out", str(root / "x")])
    with pytest.raises(SystemExit, match="export phase first"):
        latency.main(["--measure", str(root / "missing")])


def test_conformer_needs_the_trained_recipe(tmp_path, monkeypatch):
    models = _load("latency_models")
    monkeypatch.setenv("ESC_CONFORMER_CTC_RUN", str(tmp_path / "not_trained"))
    with pytest.raises(models.BenchmarkError, match="conformer_ctc/train.py"):
        models.build("conformer_ctc")
