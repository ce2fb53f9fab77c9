"""Activation PTQ passes: NoisyQuant (``ptq=("noisyquant",)``) and HyQ's QADS (``ptq=("hyq",)``).

Real torch / modelopt / ONNX Runtime objects and the real honk res8-narrow, no mocks.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import esc_plugin as esc
from esc_plugin.core.errors import ConfigError
from esc_plugin.core.quantizers import TensorQuantizer
from esc_plugin.core.state import state_digest


class Mixed(nn.Module):
    """Linear without bias, GELU (heavy-tailed), an unpadded dilated grouped conv, a zero-padded conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 24, bias=False)
        self.c = nn.Conv1d(24, 16, 3, dilation=2, groups=2)
        self.p = nn.Conv1d(16, 8, 3, padding=1)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = nn.functional.gelu(self.a(x)).transpose(1, 2)
        h = torch.relu(self.p(torch.relu(self.c(h))))
        return self.out(h.mean(2))


def _setup(model_cls=Mixed, shape=(6, 20, 12), n=3, seed=0):
    torch.manual_seed(seed)
    model = model_cls().eval()
    data = [torch.randn(*shape) * 2 for _ in range(n)]

    def loop(m):
        for x in data:
            m(x)

    return model, data, loop


def _all_quantizers(q, enabled):
    for m in q.modules():
        if isinstance(m, TensorQuantizer):
            m.enable() if enabled else m.disable()


# ------------------------------------------------------------------ NoisyQuant

def test_noisyquant_fold_is_exact_and_covers_only_exact_sites():
    model, data, loop = _setup()
    digest = state_digest(model)
    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("noisyquant",)), loop, progress=False)
    assert state_digest(model) == digest  # the FP32 model is untouched
    noise = {name for name, m in q.named_modules() if getattr(m, "noise", None) is not None}
    assert noise and not any(n.startswith("p.") for n in noise)  # the zero-padded conv gets no noise
    assert "zero-padded conv" in q.esc_report.notes[-1]
    assert q.a.bias is not None and model.a.bias is None  # -W n folded into a new bias
    # with every quantizer off, the noise and its fold cancel: the FP32 function
    _all_quantizers(q, False)
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)


def _one_layer_errors(data):
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(32, 32)).eval()

    def loop(m):
        for x in data:
            m(x)

    def error(m):
        with torch.no_grad():
            return sum(float(((m(x) - layer(x)) ** 2).sum()) for x in data)

    plain = esc.quantize(layer, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    noisy = esc.quantize(layer, esc.QuantConfig(bits=4, method="max", ptq=("noisyquant",)), loop, progress=False)
    return error(plain), error(noisy), noisy


def test_noisyquant_lowers_the_layer_output_error_at_w4a4_or_keeps_no_noise():
    torch.manual_seed(2)
    # smooth, wide activations: a searched noisy bias lowers the quantized output error
    plain, noisy, q = _one_layer_errors([torch.rand(64, 32) * 4 - 2 for _ in range(4)])
    assert q[0].input_quantizer.noise is not None and noisy < plain
    state = q.esc_state["transforms"][0]["state"]
    assert all(isinstance(v, torch.Tensor) for d in state.values() for v in d.values())  # tensors only
    # post-GELU activations, peaked at 0, which the symmetric grid holds exactly: noise would only
    # add error, so the amplitude search keeps K = 0 and the model is plain quantization
    plain, noisy, q = _one_layer_errors([nn.functional.gelu(torch.randn(64, 32) * 3) for _ in range(4)])
    assert q[0].input_quantizer.noise is None and noisy == plain
    assert "0.0: 1" in q.esc_report.notes[-1]


def test_noisyquant_save_load_and_qdq_export_match(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from esc_plugin.export.onnx import export_qdq_onnx, op_counts
    import onnx

    model, data, loop = _setup()
    q = esc.quantize(model, esc.QuantConfig(bits=8, method="max", ptq=("noisyquant",)), loop, progress=False)
    esc.save(q, tmp_path / "q.pt")
    restored = esc.load(model, tmp_path / "q.pt")
    with torch.no_grad():
        for x in data:
            assert torch.equal(restored(x), q(x))
    path = export_qdq_onnx(restored, data[0], tmp_path / "q.onnx", ["x"], ["y"], clip_activations=True)
    graph = onnx.load(path).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    clips = {n.output[0]: made_by.get(n.input[0]) for n in graph.node if n.op_type == "Clip"}
    # the noise is an Add in front of the QuantizeLinear (through the narrow-range Clip) of the noisy sites
    assert "Add" in {clips.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert op_counts(path)["QuantizeLinear"] == 4
    # ORT's basic rewrites only: the Q/DQ nodes run literally (its fused int8 kernels saturate on
    # CPUs without VNNI, see export.int8_kernels_exact), so the graph is the simulation's arithmetic.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in data:
            np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], q(x).numpy(), atol=1e-5)


def test_noisyquant_runs_before_bias_correction_and_the_order_is_checked():
    model, data, loop = _setup()
    with pytest.raises(ConfigError, match="out of order"):
        esc.QuantConfig(method="max", ptq=("bias_correction", "noisyquant"))
    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("noisyquant", "bias_correction")),
                     loop, progress=False)
    assert [p["name"] for p in q.esc_report.ptq] == ["noisyquant", "bias_correction"]
    # bias correction measures the shift against W (x + n) + b - W n, so it keeps the fold: with the
    # quantizers off, the output differs from FP32 only by the (small) corrections
    _all_quantizers(q, False)
    with torch.no_grad():
        x = data[0]
        assert float((q(x) - model(x)).abs().max()) < 0.5 * float(model(x).abs().max())


class NormOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(x)


class PaddedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(12, 8, 3, padding=1)

    def forward(self, x):
        return self.c(x.transpose(1, 2))


def test_passes_that_cannot_apply_say_what_they_looked_for():
    model, data, loop = _setup(NormOnly)
    digest = state_digest(model)
    with pytest.raises(ConfigError, match=r"noisyquant.*needs nn.Linear or nn.Conv1d/2d.*NormOnly has none"):
        esc.quantize(model, esc.QuantConfig(method="max", ptq=("noisyquant",)), loop, progress=False)
    with pytest.raises(ConfigError, match=r"hyq.*needs ungrouped nn.Conv1d / nn.Conv2d.*NormOnly has none"):
        esc.quantize(model, esc.QuantConfig(method="max", ptq=("hyq",)), loop, progress=False)
    model, data, loop = _setup(PaddedConvs)
    digest = state_digest(model)
    with pytest.raises(ConfigError, match=r"no quantized nn.Linear or unpadded.*zero-padded conv"):
        esc.quantize(model, esc.QuantConfig(method="max", ptq=("noisyquant",)), loop, progress=False)
    with pytest.raises(ConfigError, match="smoothquant_alpha='auto'"):
        esc.quantize(model, esc.QuantConfig(method="max", ptq=("smoothquant", "hyq")), loop, progress=False)
    assert state_digest(model) == digest
    assert type(model.c) is nn.Conv1d  # never wrapped: the pipeline works on a copy


# ------------------------------------------------------------------ HyQ (QADS)

class ConvTransformer(nn.Module):
    """A speech-shaped CNN -> transformer: conv front end (outlier channels), encoder layer, Linear head."""

    def __init__(self):
        super().__init__()
        self.front = nn.Conv1d(10, 16, 3, padding=1)
        self.point = nn.Conv1d(16, 16, 1)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x: (batch, time, 10)
        h = self.point(torch.relu(self.front(x.transpose(1, 2))))
        return self.head(self.encoder(h.transpose(1, 2))).mean(1)


def test_hyq_scales_the_conv_front_end_of_a_cnn_transformer(tmp_path):
    torch.manual_seed(0)
    model = ConvTransformer().eval()
    gain = torch.ones(10)
    gain[3] = 40.0  # one outlier input channel, the inter-channel variance QADS addresses
    data = [torch.randn(4, 24, 10) * gain for _ in range(3)]

    def loop(m):
        for x in data:
            m(x)

    digest = state_digest(model)
    plain = esc.quantize(model, esc.QuantConfig(bits=4, method="max"), loop, progress=False)
    q = esc.quantize(model, esc.QuantConfig(bits=4, method="max", ptq=("hyq",)), loop, progress=False)
    assert state_digest(model) == digest
    assert q.esc_report.ptq[0]["name"] == "hyq" and "scaled" in q.esc_report.notes[-1]
    assert q.front.input_quantizer.pre_scale is not None
    assert not any("encoder" in p.name or p.name == "head" for p in q.esc_plan.points
                   if p.input_quantizer.pre_scale is not None)  # Linear inputs are left to smoothquant

    def layer_error(m, name):
        site = dict(m.named_modules())[name]
        ref, got = [], []
        h = [model.front.register_forward_hook(lambda mod, a, o: ref.append(o)),
             site.register_forward_hook(lambda mod, a, o: got.append(o))]
        with torch.no_grad():
            for x in data:
                model(x), m(x)
        for handle in h:
            handle.remove()
        return sum(float(((g - r) ** 2).sum()) for g, r in zip(got, ref))

    assert layer_error(q, "front") < layer_error(plain, "front")
    # FP32 function kept: with quantizers off the scaled copy computes the FP32 output
    esc.save(q, tmp_path / "hyq.pt")
    restored = esc.load(model, tmp_path / "hyq.pt")
    with torch.no_grad():
        for x in data:
            assert torch.equal(restored(x), q(x))
    _all_quantizers(q, False)
    with torch.no_grad():
        torch.testing.assert_close(q(data[0]), model(data[0]), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ real honk res8-narrow

@pytest.fixture(scope="module")
def honk():
    from conftest import shared_root

    root = shared_root()
    if not (root / "models" / "honk" / "res8_narrow.pt").is_file() or not (root / "data").is_dir():
        pytest.skip(f"real data not found at {root}: set ESC_SHARED to the shared/ folder")
    from esc_plugin.tasks import get_task

    return get_task("honk", shared_root=root, n_calib=16, eval_limit=20)


def test_honk_max_with_noisyquant_and_hyq(honk, tmp_path):
    model = honk.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = esc.QuantConfig(bits=4, method="max", ptq=("hyq", "noisyquant"), init_max_elements=1 << 15)
    q = esc.quantize(model, config, honk.forward_loop, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p["name"] for p in q.esc_report.ptq] == ["hyq", "noisyquant"]
    note = next(n for n in q.esc_report.notes if n.startswith("noisyquant"))
    assert "of 1 foldable sites" in note and "zero-padded conv" in note  # res8 pads all its convs
    assert isinstance(honk.objective(q), float)
    esc.save(q, tmp_path / "honk.pt")
    restored = esc.load(model, tmp_path / "honk.pt")
    assert honk.objective(restored) == honk.objective(q)
