"""Deployment path on real torch / modelopt / onnx / onnxruntime objects (no mocks).

Tolerances (ONNX Runtime, integer kernels on, vs the PyTorch fake-quantized model):

* default export (standard int8 QDQ): ONNX's QuantizeLinear saturates to
  [-128, 127] while the simulation is narrow range [-127, 127], so activations
  below -amax differ by one quantization step (this happens even on calibration
  data: inputs of quantized ops exceed their FP32-calibrated max). Asserted:
  relative L2 error <= 2e-2 and <= 1/4 of the quantization error itself
  (||sim - fp32||), max abs error <= 5 % of max |y|.
* ``clip_activations=True`` (Clip to [-127, 127] * scale before each Q): same
  arithmetic as the simulation; asserted max abs error <= 1e-4 (measured ~1e-7).
"""
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
from speechbrain.nnet.attention import RelPosEncXL

import esc_plugin as esc
from esc_plugin.core.errors import QuantizationError
from esc_plugin.export import (INTEGER_OPS, ExportError, OrtRunner, TrtRunner, build_engine, int8_kernels_exact,
                               count_qdq, export_metadata, export_qdq_onnx, integer_ops,
                               op_counts, ort_optimized_model, qdq_nodes)

torch.set_num_threads(1)
FEATS = 20
TRT_REASON = "tensorrt is not installed (its PyPI packages fetch binaries from NVIDIA's index at install time)"


class ConvNet(nn.Module):
    """(B, FEATS, T) -> Conv1d -> ReLU -> LayerNorm -> Linear -> (B, T, 5)."""

    time_axis = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(FEATS, 32, 3, padding=1)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.norm(torch.relu(self.conv(x)).transpose(1, 2)))


class AttnNet(nn.Module):
    """(B, T, FEATS) -> self-attention and cross-attention (nn.MultiheadAttention) -> (B, T, 5).

    The cross-attention's query and key/value differ, so its packed in_proj_weight is
    applied as two row slices ([0:32] and [32:96]): the F.linear call-site path.
    """

    time_axis = 1

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(FEATS, 32)
        self.mem = nn.Linear(FEATS, 32)
        self.self_att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.cross_att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.self_att(h, h, h)  # need_weights=True path
        h = h + a
        m = self.mem(x)
        c, _ = self.cross_att(h, m, m, need_weights=False)
        return self.fc(h + c)


class ConformerNet(nn.Module):
    """(B, T, FEATS) -> Linear -> SpeechBrain ConformerEncoder (RelPosMHAXL) -> Linear."""

    time_axis = 1

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(FEATS, 32)
        self.pos = RelPosEncXL(32)
        self.enc = ConformerEncoder(num_layers=1, d_model=32, d_ffn=64, nhead=4, kernel_size=5,
                                    attention_type="RelPosMHAXL", dropout=0.0)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.enc(h, pos_embs=self.pos(h))
        return self.fc(h)


MODELS = {"conv": ConvNet, "mha": AttnNet, "conformer": ConformerNet}


def features(model_cls, batch, time, seed):
    """Speech-like features (channels with very different ranges) in the model's layout."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, time, FEATS, generator=g) * torch.linspace(0.2, 4.0, FEATS)
    return x.transpose(1, 2).contiguous() if model_cls.time_axis == 2 else x


def dynamic_axes(model_cls):
    return {"feats": {0: "batch", model_cls.time_axis: "time"}, "logits": {0: "batch", 1: "time"}}


def quantize(model_cls, **config):
    torch.manual_seed(0)
    model = model_cls().eval()
    data = [features(model_cls, 4, 24, seed) for seed in range(3)]

    def loop(m):
        for x in data:
            m(x)

    cfg = esc.QuantConfig(**{"bits": 8, "method": "max", **config})
    return model, esc.quantize(model, cfg, loop, progress=False), data


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    cls = MODELS[request.param]
    model, qmodel, data = quantize(cls)
    folder = tmp_path_factory.mktemp(request.param)
    example = features(cls, 2, 16, seed=10)
    paths = {}
    for clip in (False, True):
        paths[clip] = export_qdq_onnx(qmodel, (example,), str(folder / f"model_clip{int(clip)}.onnx"),
                                      ["feats"], ["logits"], dynamic_axes=dynamic_axes(cls),
                                      clip_activations=clip, int8_weights=clip)
    # path: float weights -> Q -> DQ (inspected below); clip_path: the default int8 weights.
    return {"name": request.param, "cls": cls, "model": model, "qmodel": qmodel, "data": data,
            "path": paths[False], "clip_path": paths[True], "folder": folder, "example": example}


def _initializers(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_qdq_graph(exported):
    path = exported["path"]
    onnx.checker.check_model(path, full_check=True)
    counts = count_qdq(path)
    assert counts["QuantizeLinear"] > 0 and counts["QuantizeLinear"] == counts["DequantizeLinear"]
    meta = export_metadata(path)
    assert meta["mode"] == "qdq" and meta["act_bits"] == "8" and meta["weight_bits"] == "8"

    model = onnx.load(path)
    inits = _initializers(model)
    nodes = qdq_nodes(model)
    n_weight = n_act = 0
    for node in nodes:
        zp, scale = node["zero_point"], node["scale"]
        assert zp is not None and zp.dtype == np.int8 and not zp.any(), node
        assert scale is not None and scale.dtype == np.float32 and (scale > 0).all(), node
        if node["op"] != "QuantizeLinear":
            continue
        if node["input"] in inits:  # a weight: per output channel
            w = inits[node["input"]]
            assert node["axis"] == 0 and scale.shape == (w.shape[0],), node
            n_weight += 1
        else:  # an activation: per tensor
            assert scale.shape == () and node["axis"] is None, node
            n_act += 1
    plan = exported["qmodel"].esc_plan
    active = [p for p in plan.points if p.input_quantizer.is_enabled]
    assert n_act == len(active)
    assert n_weight == len(active) - sum(p.op == "layer_norm" for p in active)
    # every DequantizeLinear reads a QuantizeLinear output: pairs
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert all(n.input[0] in q_outputs for n in model.graph.node if n.op_type == "DequantizeLinear")
    # the scales are the calibrated ones
    amax = {np.float32(float(p.input_quantizer.amax)) / np.float32(127) for p in active}
    assert {n["scale"].item() for n in nodes if n["scale"].shape == ()} == {float(a) for a in amax}


def test_int8_weight_initializers(exported, tmp_path):
    """The default export stores weights as int8 codes -> DQ: same outputs, smaller file."""
    qmodel, cls = exported["qmodel"], exported["cls"]
    float_w = exported["path"]
    int8_w = export_qdq_onnx(qmodel, (exported["example"],), str(tmp_path / "int8w.onnx"), ["feats"],
                             ["logits"], dynamic_axes=dynamic_axes(cls))
    onnx.checker.check_model(int8_w, full_check=True)
    model = onnx.load(int8_w)
    inits = _initializers(model)
    assert export_metadata(model)["int8_weights"] == "True"
    assert not any(n["op"] == "QuantizeLinear" and n["input"] in inits for n in qdq_nodes(model))
    weight_dq = [n for n in qdq_nodes(model) if n["op"] == "DequantizeLinear" and n["input"] in inits]
    assert weight_dq and all(inits[n["input"]].dtype == np.int8 for n in weight_dq)
    # per output channel, along whichever axis holds the channels once stored in the op's layout
    assert all(n["scale"].shape == (inits[n["input"]].shape[n["axis"]],) for n in weight_dq)
    assert all(np.abs(inits[n["input"]].astype(int)).max() <= 127 for n in weight_dq)
    # compact: no Constant node, each distinct constant stored once (a zero point stays its quantizer's
    # own: ORT fuses only then), no Transpose of a stored weight
    assert not op_counts(model).get("Constant")
    zero_points = {n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    keys = [(t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer
            if t.name not in zero_points]
    assert len(keys) == len(set(keys))
    weight_outputs = {n.output[0] for n in model.graph.node
                      if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weight_outputs]
    x = features(cls, 3, 23, seed=4)
    for level in ("disable", "basic", "all"):
        np.testing.assert_array_equal(OrtRunner(int8_w, optimization=level)(x)[0],
                                      OrtRunner(float_w, optimization=level)(x)[0])
    assert integer_ops(ort_optimized_model(int8_w, tmp_path / "int8w.opt.onnx")) == \
        integer_ops(ort_optimized_model(float_w, tmp_path / "floatw.opt.onnx"))
    assert os.path.getsize(int8_w) < os.path.getsize(float_w)


def _errors(ref, got, fp32):
    d = got - ref
    return {"max_abs": float(np.abs(d).max()),
            "rel_l2": float(np.linalg.norm(d) / np.linalg.norm(ref)),
            "quant_rel_l2": float(np.linalg.norm(ref - fp32) / np.linalg.norm(ref)),
            "max_ref": float(np.abs(ref).max())}


# Lengths where no activation lies within float rounding of a quantization tie: the Conformer's
# positional input (amax exactly 1.0) has near-ties at some lengths (e.g. 9, 31), where torch's
# fake quantization and ORT's QuantizeLinear may round one value to neighbouring levels.
@pytest.mark.parametrize("batch,time", [(3, 37), (1, 11)])
def test_ort_dynamic_shapes_match_simulation(exported, batch, time):
    cls, qmodel, model = exported["cls"], exported["qmodel"], exported["model"]
    x = features(cls, batch, time, seed=100 + batch)  # not the export example's (2, 16)
    with torch.no_grad():
        sim, fp32 = qmodel(x).numpy(), model(x).numpy()
    # Without VNNI, ORT's fused int8 kernels saturate (see int8_kernels_exact): compare the
    # Q/DQ graph itself there (fusions off); test_ort_runs_integer_kernels covers the fusions.
    level = "all" if int8_kernels_exact() else "basic"
    got = OrtRunner(exported["path"], optimization=level)(x)[0]
    assert got.shape == sim.shape == (batch, time, 5)
    err = _errors(sim, got, fp32)
    print(exported["name"], (batch, time), err)
    assert err["rel_l2"] <= 2e-2, err
    assert err["rel_l2"] <= 0.25 * err["quant_rel_l2"], err
    assert err["max_abs"] <= 0.05 * err["max_ref"], err

    exact = OrtRunner(exported["clip_path"], optimization=level)(x)[0]
    assert np.abs(exact - sim).max() <= 1e-4, _errors(sim, exact, fp32)


def test_ort_runs_integer_kernels(exported):
    optimized = ort_optimized_model(exported["path"], exported["folder"] / "optimized.onnx")
    ops = integer_ops(optimized)
    print(exported["name"], ops, dict(op_counts(optimized)))
    assert ops and set(ops) <= INTEGER_OPS
    n_linear = sum(p.op == "linear" for p in exported["qmodel"].esc_plan.points
                   if p.input_quantizer.is_enabled)
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) == n_linear
    # the integer kernels compute what the literal Q/DQ graph computes, up to rounding:
    # exact int32 accumulation, but QLinearConv also rounds its bias to the int32 grid
    # (scale s_x * s_w) and requantizes its output, which can move an output code by one.
    x = features(exported["cls"], 2, 30, seed=7)
    literal = OrtRunner(exported["path"], optimization="disable")(x)[0]
    fused = OrtRunner(exported["path"])(x)[0]
    err = _errors(literal, fused, exported["model"](x).detach().numpy())
    print("integer kernels vs literal QDQ", err)
    if not int8_kernels_exact():
        pytest.skip(f"this CPU has no VNNI: ONNX Runtime's u8s8 int8 kernels saturate (measured {err}); "
                    "the graph itself matches the simulation (test_ort_dynamic_shapes_match_simulation)")
    assert err["rel_l2"] <= 1e-2 and err["max_abs"] <= 0.05 * err["max_ref"], err


def test_export_leaves_model_unchanged(exported):
    qmodel = exported["qmodel"]
    x = features(exported["cls"], 2, 11, seed=3)
    with torch.no_grad():
        before = qmodel(x)
    export_qdq_onnx(qmodel, (x,), exported["folder"] / "again.onnx", ["feats"], ["logits"],
                    dynamic_axes=dynamic_axes(exported["cls"]))
    with torch.no_grad():
        after = qmodel(x)
    assert torch.equal(before, after)
    assert F.multi_head_attention_forward.__module__ == "torch.nn.functional"
    for m in qmodel.modules():
        assert "_fake_quantize" not in m.__dict__ and "esc_qweight_view" not in m.__dict__


def test_functional_linear_exports_row_slices():
    """nn.MultiheadAttention's F.linear call sites become W[rows] -> Q -> DQ, not as_strided."""
    _, qmodel, data = quantize(AttnNet)
    names = {p.name for p in qmodel.esc_plan.points}
    assert {"cross_att.in_proj_weight[0:32]", "cross_att.in_proj_weight[32:96]",
            "self_att.in_proj_weight", "self_att.out_proj.weight"} <= names
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = export_qdq_onnx(qmodel, data[0], os.path.join(tmp, "m.onnx"), ["feats"], ["logits"],
                               dynamic_axes=dynamic_axes(AttnNet), int8_weights=False)
        model = onnx.load(path)
    ops = op_counts(model)
    inits = _initializers(model)
    weight_dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and any(q.output[0] == n.input[0] and q.input[0] in inits
                         for q in model.graph.node if q.op_type == "QuantizeLinear")}
    consumers = {n.op_type for n in model.graph.node if set(n.input) & weight_dq}
    assert consumers <= {"MatMul", "Gemm", "Transpose"}, consumers  # no as_strided Gather
    weight_rows = sorted(inits[n["input"]].shape[0] for n in qdq_nodes(model)
                         if n["op"] == "QuantizeLinear" and n["input"] in inits)
    # inp, mem, fc, self in_proj (96), self out_proj, cross rows 0:32 and 32:96, cross out_proj
    assert weight_rows == sorted([32, 32, 5, 96, 32, 32, 64, 32]), weight_rows
    assert ops["QuantizeLinear"] == 16


# ---------------------------------------------------------------- errors

def test_uncalibrated_model_is_refused(tmp_path):
    model = ConvNet().eval()
    with pytest.raises(ExportError, match=r"call esc\.quantize") as info:
        export_qdq_onnx(model, features(ConvNet, 1, 8, 0), tmp_path / "m.onnx", ["feats"], ["logits"])
    assert isinstance(info.value, QuantizationError)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("value,pattern", [(0.0, "zero"), (float("nan"), "non-finite"),
                                           (float("inf"), "non-finite")])
def test_bad_amax_is_refused(tmp_path, value, pattern):
    _, qmodel, data = quantize(ConvNet)
    qmodel.fc.input_quantizer.amax = torch.tensor(value)
    with pytest.raises(ExportError, match=pattern) as info:
        export_qdq_onnx(qmodel, data[0], tmp_path / "m.onnx", ["feats"], ["logits"])
    assert "'fc'" in str(info.value) and "esc.quantize" in str(info.value)


def test_w4a4_int8_refused_and_simulation_export(tmp_path):
    model, qmodel, data = quantize(ConvNet, bits=4)
    with pytest.raises(ExportError, match=r"act_bits=4.*mode='simulation'.*act_bits=8"):
        export_qdq_onnx(qmodel, data[0], tmp_path / "w4a4.onnx", ["feats"], ["logits"])
    path = export_qdq_onnx(qmodel, data[0], tmp_path / "w4a4_sim.onnx", ["feats"], ["logits"],
                           dynamic_axes=dynamic_axes(ConvNet), mode="simulation")
    onnx.checker.check_model(path, full_check=True)
    ops = op_counts(path)
    assert count_qdq(path) == {"QuantizeLinear": 0, "DequantizeLinear": 0}
    assert ops["Round"] == 5  # 3 activations + 2 weights, as float Mul/Round/Clip/Div
    x = features(ConvNet, 3, 29, seed=5)
    with torch.no_grad():
        sim = qmodel(x).numpy()
    assert np.abs(OrtRunner(path)(x)[0] - sim).max() <= 1e-4
    # TensorRT refuses INT4 activations before it is even imported
    with pytest.raises(ExportError, match="no INT4 activations"):
        build_engine(path, tmp_path / "w4a4.engine", {"feats": ((1, FEATS, 8),) * 3})
    # weight-only: weight Q/DQ, float activations
    wo = export_qdq_onnx(qmodel, data[0], tmp_path / "w4_only.onnx", ["feats"], ["logits"],
                         mode="weight_only")
    assert count_qdq(wo)["QuantizeLinear"] == 2


def test_w4a8_exports_int4_weights_on_int8_grid(tmp_path):
    _, qmodel, data = quantize(ConvNet, weight_bits=4, act_bits=8)
    path = export_qdq_onnx(qmodel, data[0], tmp_path / "w4a8.onnx", ["feats"], ["logits"],
                           dynamic_axes=dynamic_axes(ConvNet), clip_activations=True, int8_weights=False)
    model = onnx.load(path)
    inits = _initializers(model)
    for node in qdq_nodes(model):
        if node["op"] == "QuantizeLinear" and node["input"] in inits:
            w = inits[node["input"]]
            amax = np.abs(w).reshape(w.shape[0], -1).max(1)
            np.testing.assert_allclose(node["scale"], amax / 7, rtol=1e-6)
    x = features(ConvNet, 2, 21, seed=8)
    with torch.no_grad():
        sim = qmodel(x).numpy()
    assert np.abs(OrtRunner(path)(x)[0] - sim).max() <= 1e-4


def test_failed_export_keeps_existing_file(tmp_path):
    _, qmodel, _ = quantize(ConvNet)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    wrong = torch.randn(2, FEATS + 1, 10)  # conv expects FEATS channels
    with pytest.raises(ExportError, match="torch.onnx.export"):
        export_qdq_onnx(qmodel, wrong, target, ["feats"], ["logits"])
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.onnx"]
    with pytest.raises(ExportError, match="input_names"):
        export_qdq_onnx(qmodel, (wrong, wrong), target, ["feats"], ["logits"])


# ---------------------------------------------------------------- TensorRT

def _tensorrt_installed():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_tensorrt_engine(exported, tmp_path):
    pytest.importorskip("tensorrt", reason=TRT_REASON)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    cls = exported["cls"]
    shape = lambda b, t: (b, FEATS, t) if cls.time_axis == 2 else (b, t, FEATS)  # noqa: E731
    engine = build_engine(exported["path"], tmp_path / "model.engine",
                          {"feats": (shape(1, 4), shape(2, 32), shape(4, 64))})
    x = features(cls, 3, 37, seed=11)
    with torch.no_grad():
        sim, fp32 = exported["qmodel"](x).numpy(), exported["model"](x).numpy()
    got = TrtRunner(engine)(x, as_numpy=True)[0]
    err = _errors(sim, got, fp32)
    assert err["rel_l2"] <= 0.25 * err["quant_rel_l2"] and err["rel_l2"] <= 2e-2, err


@pytest.mark.skipif(_tensorrt_installed(), reason="tensorrt is installed")
def test_tensorrt_missing_is_a_clear_error(tmp_path):
    _, qmodel, data = quantize(ConvNet)
    path = export_qdq_onnx(qmodel, data[0], tmp_path / "m.onnx", ["feats"], ["logits"],
                           dynamic_axes=dynamic_axes(ConvNet))
    # shapes are validated against the ONNX inputs first
    with pytest.raises(ExportError, match=r"dynamic axes.*shapes="):
        build_engine(path, tmp_path / "m.engine")
    with pytest.raises(ExportError, match="TensorRT is not installed: pip install tensorrt"):
        build_engine(path, tmp_path / "m.engine",
                     {"feats": ((1, FEATS, 4), (2, FEATS, 32), (4, FEATS, 64))})
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        TrtRunner(tmp_path / "m.engine")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_export_attention_matches_torch(batch_first):
    """The shape-free F.multi_head_attention_forward used while exporting equals torch's."""
    from esc_plugin.export._attention import patched_mha

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q, kv = torch.randn(3, 7, 16), torch.randn(3, 9, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, -3:] = True
    cases = [
        dict(query=q, key=q, value=q),
        dict(query=q, key=kv, value=kv, key_padding_mask=pad),
        dict(query=q, key=kv, value=kv, attn_mask=torch.randn(7, 9), average_attn_weights=False),
        dict(query=q, key=kv, value=kv, attn_mask=torch.rand(12, 7, 9) > 0.8, need_weights=False),
        dict(query=q[0] if batch_first else q[:, 0], key=kv[0] if batch_first else kv[:, 0],
             value=kv[0] if batch_first else kv[:, 0]),  # unbatched
    ]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for kwargs in cases:
            with torch.no_grad():
                ref = mha(**kwargs)
                with patched_mha():
                    got = mha(**kwargs)
            torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
            assert (got[1] is None) == (ref[1] is None)
            if ref[1] is not None:
                torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
