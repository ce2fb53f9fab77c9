"""Ops outside the paper's set, opt-in: attention products (quantize_attention) and embedding tables
(quantize_embeddings). Real torch, modelopt, onnx, ORT; no mocks."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import esc_plugin as esc
from esc_plugin.core.attention import AttentionQuantizers, quantized_sdpa

D, HEADS, LAYERS = 32, 4, 2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, 64, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    data = [torch.randn(2, 20, D) for _ in range(4)]

    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    def error(m):
        with torch.no_grad():
            return sum(float(((m(x) - model(x)) ** 2).mean()) for x in data)

    return model, data, loop, error


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_attention_products_are_quantized_and_reported(setup):
    model, data, loop, error = setup
    plain = esc.quantize(model, esc.QuantConfig(method="max"), loop, progress=False)
    q = esc.quantize(model, esc.QuantConfig(method="max", quantize_attention=True), loop, progress=False)
    fused = [c for c in plain.esc_report.coverage if c["op"] == "fused_attention"]
    assert len(fused) == LAYERS  # without the option the attention products are listed as float
    rows = [c for c in q.esc_report.coverage if c["op"] == "attention"]
    assert sorted(c["name"] for c in rows) == sorted(
        f"layers.{i}.self_attn.sdpa.{r}" for i in range(LAYERS) for r in ("query", "key", "value"))
    assert all(c["quantized"] for c in rows)
    assert not [c for c in q.esc_report.coverage if c["op"] == "fused_attention"]
    assert all(isinstance(q.get_submodule(f"layers.{i}.self_attn.esc_attention"), AttentionQuantizers)
               for i in range(LAYERS))
    with torch.no_grad():
        x = data[0]
        ref, got, got_plain = model(x), q(x), plain(x)
    assert 0 < _rel(got, ref) < 0.05  # W8A8 products: close to FP32 but not equal
    assert not torch.equal(got, got_plain)


def test_fp32_model_and_other_models_unaffected(setup):
    model, data, loop, _ = setup
    x = data[0]
    with torch.no_grad():
        before = model(x)
    esc.quantize(model, esc.QuantConfig(method="max", quantize_attention=True), loop, progress=False)
    with torch.no_grad():
        after = model(x)
        mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
        y, _ = mha(x, x, x, need_weights=False)
        q, k, v = (torch.randn(2, HEADS, 5, 8) for _ in range(3))
        direct = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(before, after)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(direct, torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1) @ v)


@pytest.mark.parametrize("case", ["none", "bool", "float", "causal", "fully_masked_row"])
def test_explicit_product_equals_torch_sdpa(case):
    """With the quantizers off, the written-out product is torch's SDPA (masks included)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    kwargs = {}
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(6, 7) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif case == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 7)
    elif case == "causal":
        k, v = k[:, :, :6], v[:, :, :6]
        kwargs["is_causal"] = True
    elif case == "fully_masked_row":
        kwargs["attn_mask"] = torch.ones(6, 7, dtype=torch.bool)
        kwargs["attn_mask"][2] = False
    quantizers = AttentionQuantizers("t", 8)
    for m in (quantizers.query, quantizers.key, quantizers.value, quantizers.probs):
        m.disable()
    got = quantized_sdpa(quantizers, q, k, v, **kwargs)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    if case == "fully_masked_row":
        ref = torch.nan_to_num(ref)  # torch's math kernel may give NaN there; we give 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_esc_searches_attention_scales_and_save_load(setup, tmp_path):
    model, data, loop, error = setup
    cfg = esc.QuantConfig(bits=8, budget=12, quantize_attention=True)
    q = esc.quantize(model, cfg, loop, error, progress=False)
    names = [layer.name for layer in q.esc_report.layers]
    assert sum(".sdpa." in n for n in names) == 3 * LAYERS
    r = q.esc_report.objective
    assert r["chosen"] <= r["init"]
    path = esc.save(q, tmp_path / "q.pt")
    again = esc.load(model, path)
    with torch.no_grad():
        torch.testing.assert_close(again(data[1]), q(data[1]), rtol=0, atol=0)


def test_qdq_export_runs_attention_as_integer_matmuls(setup, tmp_path):
    from esc_plugin.export import OrtRunner, export_qdq_onnx, integer_ops, ort_optimized_model

    model, data, loop, _ = setup
    q = esc.quantize(model, esc.QuantConfig(method="max", quantize_attention=True), loop, progress=False)
    path = tmp_path / "attn.onnx"
    export_qdq_onnx(q, (data[0],), path, ["x"], ["y"], {"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    x = data[1]  # calibration data: no value beyond amax, so the Q/DQ graph equals the simulation
    with torch.no_grad():
        ref = q(x).numpy()
    graph = OrtRunner(path, optimization="disable")(x)[0]
    assert np.abs(graph - ref).max() < 1e-4
    ops = integer_ops(ort_optimized_model(path, tmp_path / "opt.onnx"))
    # every MatMul of the encoder, attention products included: 4 projections/FFN + 2 products per layer
    assert sum(ops.values()) == 6 * LAYERS


class Tagger(nn.Module):
    """Token and positional tables and a Linear."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, D)
        self.positions = nn.Embedding(12, D)
        self.out = nn.Linear(D, 5)

    def forward(self, ids):
        pos = self.positions(torch.arange(ids.shape[1]))
        return self.out(self.tokens(ids) + pos)


def test_embedding_tables_weight_only(tmp_path):
    import onnx
    from esc_plugin.export import OrtRunner, export_qdq_onnx

    torch.manual_seed(0)
    model = Tagger().eval()
    data = [torch.randint(0, 50, (3, 12)) for _ in range(2)]

    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    plain = esc.quantize(model, esc.QuantConfig(method="max"), loop, progress=False)
    q = esc.quantize(model, esc.QuantConfig(method="max", quantize_embeddings=True), loop, progress=False)
    assert not any(c["quantized"] for c in plain.esc_report.coverage if c["name"] in ("tokens", "positions"))
    rows = {c["name"]: c for c in q.esc_report.coverage}
    assert rows["tokens"]["quantized"] and rows["positions"]["op"] == "embedding"
    table = q.tokens.weight_quantizer(q.tokens.weight)
    assert len(torch.unique(table[0])) <= 255 and not torch.equal(table, model.tokens.weight)
    with torch.no_grad():
        assert 0 < _rel(q(data[0]), model(data[0])) < 0.05
    again = esc.load(model, esc.save(q, tmp_path / "q.pt"))
    with torch.no_grad():
        torch.testing.assert_close(again(data[1]), q(data[1]), rtol=0, atol=0)
    path = tmp_path / "tagger.onnx"
    export_qdq_onnx(q, (data[0],), path, ["ids"], ["y"])
    int8 = {tuple(t.dims) for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert {(50, D), (12, D)} <= int8  # both tables stored as int8
    with torch.no_grad():
        ref = q(data[1]).numpy()
    assert np.abs(OrtRunner(path, optimization="disable")(data[1])[0] - ref).max() < 1e-4
