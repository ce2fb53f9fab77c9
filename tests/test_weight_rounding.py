"""Weight-rounding PTQ passes: ``ptq=("adaround",)`` and ``ptq=("brecq",)``.

Real torch / modelopt / onnxruntime objects and the real honk res8-narrow, no mocks.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import esc_plugin as esc
from conftest import shared_root
from esc_plugin.core.errors import ConfigError
from esc_plugin.core.state import state_digest
from esc_plugin.core.transforms._rounding import Settings
from esc_plugin.core.transforms.brecq import find_blocks


class ConvMlp(nn.Module):
    """(B, 8, 16) -> Conv1d -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 16, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


class Encoder(nn.Module):
    """(B, T, 12) -> Linear -> 2 x nn.TransformerEncoderLayer -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


def _setup(cls, shape):
    torch.manual_seed(0)
    model = cls().eval()
    data = [torch.randn(*shape) for _ in range(3)]

    def loop(m):
        for x in data:
            m(x)

    def output_mse(q):
        with torch.no_grad():
            return sum(float(((q(x) - model(x)) ** 2).mean()) for x in data)

    return model, data, loop, output_mse


def _on_grid(qmodel):
    for p in qmodel.esc_plan.points:
        if isinstance(p.module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and hasattr(p.module, "weight_quantizer"):
            w = p.module.weight.detach()
            assert torch.equal(p.module.weight_quantizer(w), w), p.name


@pytest.fixture(scope="module")
def conv_mlp():
    model, data, loop, mse = _setup(ConvMlp, (32, 8, 16))
    digest = state_digest(model)
    nearest = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    rounded = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("adaround",)), loop, progress=False)
    assert state_digest(model) == digest  # the FP32 model is untouched
    return model, data, loop, mse, nearest, rounded


def test_adaround_lowers_the_error_and_keeps_weights_on_their_grid(conv_mlp):
    model, data, loop, mse, nearest, rounded = conv_mlp
    assert mse(rounded) < 0.9 * mse(nearest)
    state = rounded.esc_state["transforms"][0]["state"]
    assert sorted(state["codes"]) == ["conv", "fc", "out"]
    # per layer: the reconstruction loss on the calibration data never rises, and falls overall
    before, after = np.array(state["losses"]).T
    assert (after <= before).all() and after.sum() < before.sum()
    _on_grid(rounded)
    for name, codes in state["codes"].items():
        assert codes.dtype == torch.int8 and codes.abs().max() <= 7
        module = dict(rounded.named_modules())[name]
        # the per-channel scales are the calibrated ones (max |w| of the FP32 weight)
        fp32 = dict(model.named_modules())[name].weight.detach()
        amax = fp32.abs().flatten(1).amax(1)
        assert torch.allclose(module.weight_quantizer.amax.flatten(), amax)
        # only the integers changed, each by at most one step from nearest rounding
        nearest_codes = torch.round(fp32 * 7 / module.weight_quantizer.amax)
        assert (codes.float() - nearest_codes).abs().max() <= 1
    entry = rounded.esc_report.ptq[0]
    assert entry["name"] == "adaround" and entry["stage"] == "after_calibration" and entry["seconds"] > 0
    assert any(n.startswith("adaround: reconstructed 3 weight tensors") for n in rounded.esc_report.notes)


def test_save_load_roundtrip_gives_identical_outputs(conv_mlp, tmp_path):
    model, data, loop, mse, nearest, rounded = conv_mlp
    path = esc.save(rounded, tmp_path / "q.pt")
    torch.load(path, weights_only=True)  # tensors, numbers and strings only
    loaded = esc.load(model, path)
    with torch.no_grad():
        for x in data:
            assert torch.equal(loaded(x), rounded(x))


def test_qdq_export_matches_the_fake_quantized_model(tmp_path):
    from esc_plugin.export import OrtRunner, export_qdq_onnx

    model, data, loop, mse = _setup(ConvMlp, (8, 8, 16))
    q = esc.quantize(model, esc.QuantConfig(bits=8, method="max", ptq=("adaround",)), loop, progress=False)
    _on_grid(q)
    path = export_qdq_onnx(q, (data[0],), str(tmp_path / "m.onnx"), ["feats"], ["logits"],
                           clip_activations=True)
    x = torch.randn(5, 8, 16)
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(OrtRunner(path)(x)[0] - ref).max() <= 1e-4  # test_export.py's clip_activations bound


def test_brecq_reconstructs_transformer_layers_as_blocks(monkeypatch):
    monkeypatch.setattr(Settings, "iters", 150)
    model, data, loop, mse = _setup(Encoder, (4, 20, 12))
    assert [n for n, _ in find_blocks(model, lambda m: isinstance(m, nn.Linear))] == ["enc.layers.0", "enc.layers.1"]
    nearest = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("brecq",)), loop, progress=False)
    assert mse(q) < mse(nearest)
    note = next(n for n in q.esc_report.notes if n.startswith("brecq:"))
    assert "2 blocks + 2 single layers" in note, note
    assert sorted(q.esc_state["transforms"][0]["state"]["codes"]) == [
        "enc.layers.0.linear1", "enc.layers.0.linear2", "enc.layers.1.linear1", "enc.layers.1.linear2",
        "inp", "out"]
    _on_grid(q)


def test_brecq_without_blocks_is_refused_naming_what_it_looked_for():
    model, data, loop, mse = _setup(ConvMlp, (4, 8, 16))
    digest = state_digest(model)
    with pytest.raises(ConfigError, match=r"no block found in ConvMlp: looked for entries of an nn.ModuleList.*"
                                          r"conv, fc, out.*ptq=\('adaround',\)"):
        esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("brecq",)), loop, progress=False)
    assert state_digest(model) == digest


def test_adaround_on_a_model_without_weights_is_refused_before_work():
    model = nn.Sequential(nn.LayerNorm(8, elementwise_affine=False)).eval()
    calls = []

    def loop(m):
        calls.append(1)
        m(torch.randn(2, 8))

    with pytest.raises(ConfigError, match=r"nn.Linear / nn.Conv1d / nn.Conv2d layers, and Sequential has none "
                                          r"\(its quantizable ops are LayerNorm.*drop 'adaround'"):
        esc.quantize(model, esc.QuantConfig(bits=8, method="max", ptq=("adaround",)), loop, progress=False)
    assert not calls


def test_order_with_bias_correction():
    with pytest.raises(ConfigError, match=r"out of order: write \('adaround', 'bias_correction'\)"):
        esc.QuantConfig(ptq=("bias_correction", "adaround"))
    model, data, _, mse = _setup(ConvMlp, (8, 8, 16))

    def loop(m):  # recorded under inference mode: the reconstruction must still get gradients
        with torch.inference_mode():
            for x in data:
                m(x)

    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("adaround", "bias_correction")), loop,
                     progress=False)
    assert len(q.esc_state["transforms"][0]["state"]["codes"]) == 3
    assert [p["name"] for p in q.esc_report.ptq] == ["adaround", "bias_correction"]


@pytest.fixture(scope="module")
def honk():
    root = shared_root()
    if not (root / "models" / "honk" / "res8_narrow.pt").exists() or not (root / "data").is_dir():
        pytest.skip(f"honk res8-narrow or Speech Commands not found under {root}")
    from esc_plugin.tasks import get_task

    return get_task("honk", shared_root=root, n_calib=30, eval_limit=200)


def test_adaround_on_honk_res8_narrow_w4a4(honk, monkeypatch):
    monkeypatch.setattr(Settings, "iters", 200)  # the documented class-level knob; fewer steps for CI
    fp32_state = {k: v.clone() for k, v in honk.model.state_dict().items()}
    q = esc.quantize(honk.model, esc.QuantConfig(bits=4, method="max", ptq=("adaround",)), honk.forward_loop,
                     progress=False)
    after = honk.model.state_dict()
    assert all(torch.equal(fp32_state[k], after[k]) for k in fp32_state)
    assert [(p["name"], p["stage"]) for p in q.esc_report.ptq] == [("adaround", "after_calibration")]
    assert q.esc_report.ptq[0]["seconds"] > 0
    state = q.esc_state["transforms"][0]["state"]
    assert len(state["codes"]) == 8  # conv0..conv6 and the output layer
    before, rounded = np.array(state["losses"]).T
    assert rounded.sum() < before.sum()
    _on_grid(q)


def test_brecq_on_a_speechbrain_conformer_with_keyword_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(Settings, "iters", 100)
    from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder
    from speechbrain.nnet.attention import RelPosEncXL

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(12, 32)
            self.pos = RelPosEncXL(32)
            self.enc = ConformerEncoder(num_layers=2, d_model=32, d_ffn=64, nhead=4, kernel_size=5,
                                        attention_type="RelPosMHAXL", dropout=0.0)
            self.out = nn.Linear(32, 5)

        def forward(self, x):
            h = self.inp(x)
            h, _ = self.enc(h, pos_embs=self.pos(h))  # layers take pos_embs as a keyword, return tuples
            return self.out(h)

    model, data, loop, mse = _setup(Net, (2, 16, 12))
    nearest = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("brecq",)), loop, progress=False)
    note = next(n for n in q.esc_report.notes if n.startswith("brecq:"))
    assert "2 blocks + 2 single layers" in note, note
    assert mse(q) < mse(nearest)
    _on_grid(q)
    loaded = esc.load(model, esc.save(q, tmp_path / "q.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(data[0]), q(data[0]))
