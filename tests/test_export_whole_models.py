"""Whole-model exports: Whisper tiny.en encoder + decoder-step ONNX with greedy decoding over
ONNX Runtime and OpenVINO, and the Conformer-CTC artifact's CTC decoding.

Real Whisper weights from the shared folder (skipped without it), one clip,
a few tokens, so the file stays fast.
"""
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import esc_plugin as esc
from esc_plugin.export import ExportError, OrtRunner, count_qdq

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    from esc_plugin.tasks.audio import resolve_shared_root
    from esc_plugin.tasks.whisper import load_clips, load_whisper, log_mel, transcribe_tokens

    try:
        root = resolve_shared_root()
    except FileNotFoundError as exc:
        pytest.skip(f"shared data not available ({exc}): set ESC_SHARED")
    if not (root / "models" / "whisper-tiny.en").is_dir():
        pytest.skip(f"Whisper tiny.en not found under {root}/models: set ESC_SHARED")
    model, fe, _ = load_whisper(root)
    clips = sorted(load_clips(root), key=lambda c: c["id"])
    mel = log_mel(fe, [clips[0]["wav"], clips[1]["wav"]])
    return {"model": model, "mel": mel, "tmp": tmp_path_factory.mktemp("whisper"),
            "reference": transcribe_tokens(model, mel[:1], max_new_tokens=MAX_TOKENS)}


@pytest.fixture(scope="module")
def fp32_folder(whisper):
    from esc_plugin.export.whisper import export_whisper

    folder = whisper["tmp"] / "fp32"
    spec = export_whisper(whisper["model"], folder, whisper["mel"][:1])
    assert spec["quantized"] is False
    return folder


@pytest.mark.parametrize("runtime", ["ort", "openvino"])
def test_fp32_artifact_transcribes_like_pytorch(whisper, fp32_folder, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    from esc_plugin.export.whisper import WhisperArtifact

    tokens = WhisperArtifact(fp32_folder, runtime)(whisper["mel"][:1], max_new_tokens=MAX_TOKENS)
    assert tokens == whisper["reference"] and len(tokens[0]) > 3


def test_fp32_decoder_stores_the_tied_table_once(whisper, fp32_folder):
    import onnx

    vocab, width = whisper["model"].proj_out.weight.shape
    big = [t for t in onnx.load(fp32_folder / "decoder.onnx").graph.initializer
           if int(np.prod(t.dims)) == vocab * width]
    assert len(big) == 1  # token embedding and output projection share one stored table


def test_quantized_export_matches_the_fake_quantized_step(whisper, fp32_folder):
    """Q/DQ graphs run the same step as the quantized PyTorch modules (ORT with its fusions off,
    i.e. the Q/DQ graph itself; the fused int8 kernels saturate on AVX2 CPUs without VNNI)."""
    from esc_plugin.export._whisper_graphs import WhisperDecoderStep, WhisperEncoderGraph
    from esc_plugin.export.whisper import export_whisper
    from esc_plugin.tasks.whisper import transcribe_tokens

    model, mel = whisper["model"], whisper["mel"]

    def loop(m):
        transcribe_tokens(m, mel[1:], max_new_tokens=4)

    config = esc.QuantConfig(bits=8, method="max", quantize_embeddings=True, exclude=("model.encoder*",))
    q = esc.quantize(model, config, loop, progress=False)
    folder = whisper["tmp"] / "int8"
    spec = export_whisper(q, folder, mel[:1], clip_activations=True)  # saturate at -127 like the simulation
    assert spec["quantized"]
    vocab, width = model.proj_out.weight.shape
    graph = onnx.load(folder / "decoder.onnx").graph
    assert len([t for t in graph.initializer if int(np.prod(t.dims)) == vocab * width]) == 1  # tied: stored once
    assert count_qdq(folder / "decoder.onnx")["QuantizeLinear"] > 20
    assert spec["bytes"]["decoder"] < 0.3 * (whisper["tmp"] / "fp32" / "decoder.onnx").stat().st_size
    # the tied-table dedupe leaves each quantizer its own zero point (ORT's int8 fusions need it)
    readers = Counter(n.input[2] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert readers and max(readers.values()) <= 2  # a Q and its DQ

    with torch.no_grad():
        cross = WhisperEncoderGraph(q).eval()(mel[:1])
        # The decoder step is checked on the FP32 cross-attention K/V: with scales from one clip
        # (max), the quantized decoder is so sensitive that float rounding flips codes elsewhere.
        fp32_cross = WhisperEncoderGraph(model).eval()(mel[:1])
        cache = torch.zeros(2 * spec["layers"], 1, spec["heads"], 4, spec["head_dim"])
        logits, new_cache = WhisperDecoderStep(q).eval()(torch.tensor([[spec["prompt"][0]]]), torch.tensor([0]),
                                                         cache, fp32_cross)
    got_cross = OrtRunner(folder / "encoder.onnx", optimization="disable")(mel[:1])[0]
    # A value within float rounding of a rounding boundary may land one code away: compare in L2.
    assert np.linalg.norm(got_cross - cross.numpy()) <= 1e-3 * np.linalg.norm(cross.numpy())
    got, got_cache = OrtRunner(folder / "decoder.onnx", optimization="disable")(
        np.array([[spec["prompt"][0]]]), np.array([0]), cache.numpy(), fp32_cross.numpy())
    assert np.linalg.norm(got - logits.numpy()) <= 1e-2 * np.linalg.norm(logits.numpy())
    assert got.argmax(-1) == logits.argmax(-1)
    assert np.abs(got_cache[:, :, :, 1:]).max() == 0  # only slot 0 was written


def test_artifact_errors_name_the_fix(whisper, fp32_folder, tmp_path):
    from esc_plugin.export.whisper import WhisperArtifact, export_whisper

    with pytest.raises(ExportError, match="export_whisper"):
        WhisperArtifact(tmp_path)
    with pytest.raises(ExportError, match="runtime='tensorrt' is unknown"):
        WhisperArtifact(fp32_folder, runtime="tensorrt")
    with pytest.raises(ExportError, match="use at most 446"):
        WhisperArtifact(fp32_folder)(whisper["mel"][:1], max_new_tokens=1000)
    whisper["model"].train()
    try:
        with pytest.raises(ExportError, match="model.eval"):
            export_whisper(whisper["model"], tmp_path / "x")
    finally:
        whisper["model"].eval()
