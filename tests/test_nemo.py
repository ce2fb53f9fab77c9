"""NeMo integration on real NeMo objects (no mocks): a tiny Conformer-CTC trained for a few
steps on real Speech Commands audio, quantized with NeMo's dataloader and WER, saved as a
.nemo, restored, and exported through NeMo's exporter to a QDQ ONNX run by ONNX Runtime.

NeMo takes 15-30 s to import: everything shares one module-scoped model.

ONNX Runtime tolerances: with ``clip_activations=True`` and ORT's graph rewrites limited to
"basic" (the Q/DQ nodes run literally), the graph is the simulation's arithmetic: max abs
error <= 1e-4 asserted (measured ~1e-6). With every rewrite on, ORT fuses
DQ -> MatMul into ``MatMulIntegerToFloat`` (int8 kernels); on CPUs without AVX-VNNI its
u8s8 kernels saturate int16 pair sums, so the logits move by more: relative L2 <= 0.1
asserted (measured 0.04 on the 2-core AVX2 CI machine), greedy tokens mostly equal.
"""
import copy
import hashlib
import os

import numpy as np
import pytest
import torch

from conftest import shared_root

nemo_asr = pytest.importorskip("nemo.collections.asr")

import esc_plugin as esc  # noqa: E402
import esc_plugin.nemo as esc_nemo  # noqa: E402
from esc_plugin.core.errors import ConfigError  # noqa: E402
from esc_plugin.core.quantizers import TensorQuantizer  # noqa: E402
from esc_plugin.export import (ExportError, OrtRunner, count_qdq, export_metadata,  # noqa: E402
                               integer_ops, ort_optimized_model)
from esc_plugin.metrics.text import word_error_rate  # noqa: E402
from esc_plugin.nemo import ManifestError, NemoModelError  # noqa: E402

torch.set_num_threads(1)
CONF = os.path.join(os.path.dirname(__file__), "..", "recipes", "NeMo", "asr", "conf")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """FP32 tiny Conformer (4 training steps), its .nemo, manifests, and the W8A8 ESC model."""
    root = shared_root()
    if not (root / "data" / "speech_commands").is_dir():
        pytest.skip(f"real data not found at {root}: set ESC_SHARED to the shared/ folder")
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    tmp = tmp_path_factory.mktemp("nemo")
    manifests = esc_nemo.speech_commands_manifests(root / "data" / "speech_commands", tmp / "manifests",
                                                   n_calibration=100, test_fraction=0.2, seed=0)
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base=None):
        cfg = compose(config_name="conformer_ctc_char_tiny",
                      overrides=[f"data.manifest_dir={tmp / 'manifests'}"])
    pl.seed_everything(0)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True))
    model = nemo_asr.models.EncDecCTCModel(cfg=cfg.model, trainer=trainer)
    trainer.fit(model)
    fp32_path = str(tmp / "fp32.nemo")
    model.save_to(fp32_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    qmodel = esc_nemo.quantize_asr_model(model, esc.QuantConfig(bits=8, method="esc", budget=6, popsize=3),
                                         manifest=manifests["calibration"], n_samples=100,
                                         batch_size=50, progress=False)
    return {"tmp": tmp, "manifests": manifests, "model": model, "fp32_path": fp32_path,
            "fp32_sha": sha256(fp32_path), "before": before, "modes": modes, "qmodel": qmodel}


def outputs(model, feats, lens):
    with torch.no_grad():
        return model(processed_signal=feats, processed_signal_length=lens)


def test_manifests_are_speaker_disjoint(tiny):
    rows = {k: esc_nemo.read_manifest(p) for k, p in tiny["manifests"].items()}
    assert len(rows["calibration"]) == 100
    speakers = {k: {esc_nemo.manifest.speaker_of(r["audio_filepath"]) for r in v} for k, v in rows.items()}
    assert not speakers["train"] & speakers["calibration"]
    assert not speakers["train"] & speakers["test"] and not speakers["test"] & speakers["calibration"]
    assert {r["text"] for v in rows.values() for r in v} == set(esc_nemo.SPEECH_COMMANDS_WORDS)


def test_quantize_coverage_objective_and_fp32_untouched(tiny):
    model, qmodel = tiny["model"], tiny["qmodel"]
    report = qmodel.esc_report
    assert isinstance(qmodel, nemo_asr.models.EncDecCTCModel) and esc_nemo.is_quantized_asr_model(qmodel)
    assert not esc_nemo.is_quantized_asr_model(model) and type(model) is nemo_asr.models.EncDecCTCModel
    # FP32 model untouched: weights, modes, no instance forward left on its modules.
    assert all(torch.equal(tiny["before"][k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == tiny["modes"]
    from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
    causal = [m for m in model.modules() if isinstance(m, CausalConv1D)]
    assert causal and not any("forward" in m.__dict__ for m in causal)
    # Preprocessor in float (listed), encoder and decoder quantized (depthwise CausalConv1D included).
    rows = {r["name"]: r for r in report.coverage}
    assert not rows["preprocessor"]["quantized"] and "float" in rows["preprocessor"]["reason"]
    quantized = {r["name"] for r in report.coverage if r["quantized"]}
    for name in ("encoder.pre_encode.conv.0", "encoder.layers.0.self_attn.linear_q",
                 "encoder.layers.0.conv.depthwise_conv", "encoder.layers.0.norm_out", "decoder.decoder_layers.0"):
        assert name in quantized
    assert not any(n.startswith("preprocessor") for n in quantized)
    assert report.timings["n_evaluations"] >= 6
    features = qmodel.esc_features
    assert features.n_utterances == 100 and len(features.batches) == 2
    # NeMo's WER splits by batch for the selection guard (two batches: one is held back); the guard
    # weighs the final candidates the distance gate kept
    assert "selection guard: the objective's split (20% held back: 1 of 2 parts, 50 of 100 samples)" \
        in report.notes
    left_out = " ".join(n for n in report.notes if n.startswith("distance gate: left out the final"))
    kept = [n for n in ("mean", "best_sample", "init") if f"{n} (" not in left_out]
    assert "init" in kept and [r["name"] for r in report.selection][:len(kept)] == kept


def test_objective_is_corpus_wer_over_all_batches(tiny):
    """NeMo's WER with the model's decoding, summed over batches (NeMo's WER.update keeps only
    the last batch): one batch whose references are the model's own greedy output (no
    error), one with the real transcripts; checked against esc_plugin's corpus WER."""
    model, features = tiny["model"], tiny["qmodel"].esc_features
    labels = list(model.cfg.labels)
    batches, refs, hyps, transcripts = [], [], [], []
    for i, (feats, lens, tokens, token_lens) in enumerate(features.batches):
        log_probs, enc_len, _ = outputs(model.eval(), feats, lens)
        texts = [h.text for h in model.decoding.ctc_decoder_predictions_tensor(log_probs, enc_len)]
        transcripts += ["".join(labels[t] for t in row[:n]) for row, n in zip(tokens.tolist(), token_lens.tolist())]
        if i == 0:  # references = the hypotheses themselves
            ids = [[labels.index(c) for c in t] for t in texts]
            token_lens = torch.tensor([len(x) for x in ids])
            tokens = torch.tensor([x + [0] * (int(token_lens.max()) - len(x)) for x in ids]).long()
        refs += ["".join(labels[t] for t in row[:n]) for row, n in zip(tokens.tolist(), token_lens.tolist())]
        hyps += texts
        batches.append((feats, lens, tokens, token_lens))
    model.train(tiny["modes"][0])
    mixed = esc_nemo.ASRFeatureCache(batches)
    assert mixed.word_error_rate(model) == pytest.approx(word_error_rate(refs, hyps), abs=1e-6)
    # The quantization objective is the same computation on the real transcripts.
    assert tiny["qmodel"].esc_report.objective["fp32"] == pytest.approx(word_error_rate(transcripts, hyps),
                                                                        abs=1e-6)


def test_quantized_front_end_is_its_own(tiny):
    """The copy's mel front end runs the copy (NeMo wraps FilterbankFeatures.forward on the
    instance; a deep copy would otherwise call the FP32 model's, dithering in its training mode)."""
    model, qmodel = tiny["model"], tiny["qmodel"]
    featurizer = qmodel.preprocessor.featurizer
    assert featurizer.forward.__wrapped__.__self__ is featurizer
    signal, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    model.train()
    qmodel.eval()
    with torch.no_grad():
        first = qmodel.preprocessor(input_signal=signal, length=lengths)[0]
        second = qmodel.preprocessor(input_signal=signal, length=lengths)[0]
    model.train(tiny["modes"][0])
    assert torch.equal(first, second)


def test_wrapped_model_computes_fp32_with_quantizers_off(tiny):
    """The depthwise CausalConv1D keeps NeMo's padding once wrapped: quantizers off == FP32."""
    qmodel = copy.deepcopy(tiny["qmodel"]).eval()
    for m in qmodel.modules():
        if isinstance(m, TensorQuantizer):
            m.disable()
    feats, lens = tiny["qmodel"].esc_features.batches[0][:2]
    ref = outputs(tiny["model"].eval(), feats, lens)[0]
    tiny["model"].train(tiny["modes"][0])
    assert torch.allclose(outputs(qmodel, feats, lens)[0], ref, atol=1e-5)


def test_save_restore_identical_and_fp32_nemo_unchanged(tiny):
    qmodel, tmp = tiny["qmodel"], tiny["tmp"]
    path = str(tmp / "w8a8.nemo")
    qmodel.save_to(path)
    assert esc_nemo.save_restore.holds_quantization_state(path)
    restored = esc_nemo.restore_quantized_asr_model(path)
    assert type(restored) is type(qmodel)
    feats, lens = qmodel.esc_features.batches[1][:2]
    for a, b in zip(outputs(qmodel.eval(), feats, lens), outputs(restored.eval(), feats, lens)):
        assert torch.equal(a, b)
    # NeMo's plain restore opens it as the FP32 model (weights are the FP32 ones).
    plain = nemo_asr.models.ASRModel.restore_from(path, map_location="cpu").eval()
    fp32 = nemo_asr.models.ASRModel.restore_from(tiny["fp32_path"], map_location="cpu").eval()
    assert torch.equal(outputs(plain, feats, lens)[0], outputs(fp32, feats, lens)[0])
    # The FP32 .nemo is never overwritten, and is not restorable as a quantized model.
    with pytest.raises(NemoModelError, match="FP32 .nemo"):
        qmodel.save_to(tiny["fp32_path"])
    with pytest.raises(NemoModelError, match="no esc_plugin state"):
        esc_nemo.restore_quantized_asr_model(tiny["fp32_path"])
    assert sha256(tiny["fp32_path"]) == tiny["fp32_sha"]
    assert not [f for f in os.listdir(tmp) if f.startswith(".tmp-")]


def test_nemo_export_writes_qdq_and_ort_matches(tiny):
    qmodel, tmp = tiny["qmodel"].eval(), tiny["tmp"]
    # Every quantizer that runs in a forward pass has its Q/DQ pair in the graph (the attention's
    # pos_bias_u / pos_bias_v get weight quantizers that never run: they are added, not multiplied).
    called = set()
    for m in qmodel.modules():
        m.__dict__.pop("_esc_qweight_cache", None)  # so that weight quantizers run too
    hooks = [m.register_forward_hook(lambda mod, i, o: called.add(id(mod)))
             for m in qmodel.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    outputs(qmodel, *qmodel.esc_features.batches[0][:2])
    for h in hooks:
        h.remove()
    n_quantizers = len(called)
    path, float_weights = str(tmp / "w8a8.onnx"), str(tmp / "w8a8_float_weights.onnx")
    qmodel.export(path)
    esc_nemo.export_quantized_asr_model(qmodel, float_weights, int8_weights=False)
    counts = count_qdq(float_weights)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == n_quantizers
    # int8 weights: each constant W -> QuantizeLinear folded into int8 codes
    assert count_qdq(path)["DequantizeLinear"] == n_quantizers > count_qdq(path)["QuantizeLinear"]
    meta = export_metadata(path)  # checked by onnx.checker on the way
    assert meta["exporter"] == "nemo" and meta["int8_weights"] == "True"
    # Another batch size and length than NeMo's export example.
    feats, lens = qmodel.esc_features.batches[0][0][:3, :, :77], torch.tensor([77, 70, 60])
    ref = outputs(qmodel, feats, lens)[0].numpy()
    clipped = str(tmp / "w8a8_clip.onnx")
    qmodel.export(clipped, clip_activations=True)
    literal = OrtRunner(clipped, optimization="basic")(feats, lens)[0]
    assert np.abs(literal - ref).max() <= 1e-4
    fused = OrtRunner(path)(feats, lens)[0]
    assert np.linalg.norm(fused - ref) / np.linalg.norm(ref) <= 0.1
    assert integer_ops(ort_optimized_model(path, str(tmp / "ort.onnx")))
    # The positional table sized for 1 s clips: same outputs, a fraction of the file, NeMo's table back.
    table = qmodel.encoder.pos_enc.pe.clone()
    short = str(tmp / "w8a8_1s.onnx")
    qmodel.export(short, clip_activations=True, max_audio_seconds=1.0)
    assert os.path.getsize(short) < 0.5 * os.path.getsize(clipped)
    assert export_metadata(short)["max_audio_seconds"] == "1.0"
    assert torch.equal(qmodel.encoder.pos_enc.pe, table)
    np.testing.assert_array_equal(OrtRunner(short, optimization="basic")(feats, lens)[0], literal)
    too_long = torch.cat([feats] * 3, dim=2)  # 231 frames > 1 s
    with pytest.raises(Exception, match="broadcast|shape|dimension"):
        OrtRunner(short, optimization="basic")(too_long, lens * 3)
    with pytest.raises(ExportError, match="positive"):
        qmodel.export(str(tmp / "bad.onnx"), max_audio_seconds=0)
    with pytest.raises(ExportError, match="use_dynamo"):
        qmodel.export(str(tmp / "dynamo.onnx"), use_dynamo=True)
    with pytest.raises(ExportError, match="ONNX only"):
        qmodel.export(str(tmp / "model.ts"))


def test_cli_exports_a_quantized_nemo_and_checks_it(tiny, capsys):
    """``esc-quantize export w8a8.nemo --check``: NeMo's graph, run by ONNX Runtime, compared
    with the restored fake-quantized model; the .nemo itself is not touched."""
    from conftest import fails_fast
    from esc_plugin.cli import main

    tmp = tiny["tmp"]
    source, out = str(tmp / "cli_w8a8.nemo"), str(tmp / "cli_w8a8.onnx")
    tiny["qmodel"].save_to(source)
    digest = sha256(source)
    assert main(["export", source, "--format", "qdq-onnx", "--out", out, "--check", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "relative L2" in printed and export_metadata(out)["exporter"] == "nemo"
    rel_l2 = float(printed.split("relative L2 ")[1].split(",")[0])
    assert rel_l2 <= 0.1  # fused int8 kernels (see the module docstring); literal Q/DQ is tested above
    assert sha256(source) == digest
    fails_fast(["export", source, "--out", out], capsys, "already exists: pass --overwrite")


def test_label_free_objective(tiny):
    model, manifests = tiny["model"], tiny["manifests"]
    q = esc_nemo.quantize_asr_model(model, esc.QuantConfig(bits=8, budget=4, popsize=2),
                                    manifest=manifests["calibration"], n_samples=100, batch_size=50,
                                    objective="distill", progress=False)
    assert any("distillation to the FP32 outputs" in n for n in q.esc_report.notes)
    assert 0 <= q.esc_report.objective["calibration_wer"] <= 1.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tiny["before"].items())


def test_bad_input_fails_before_work(tiny):
    model, manifests = tiny["model"], tiny["manifests"]
    with pytest.raises(ConfigError, match="'metric'.*'distill'"):
        esc_nemo.quantize_asr_model(model, manifest=manifests["calibration"], objective="ctc")
    with pytest.raises(ConfigError, match="quantize='fast' is unknown"):
        esc_nemo.quantization_config("fast")
    with pytest.raises(ManifestError, match="not found"):
        esc_nemo.quantize_asr_model(model, manifest=str(tiny["tmp"] / "missing.json"))
    with pytest.raises(ManifestError, match="100 utterance.*but 101"):
        esc_nemo.quantize_asr_model(model, manifest=manifests["calibration"], n_samples=101)
    with pytest.raises(NemoModelError, match="not a quantized"):
        esc_nemo.save_quantized_asr_model(model, str(tiny["tmp"] / "x.nemo"))
