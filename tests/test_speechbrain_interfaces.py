"""Quantizing SpeechBrain pretrained interfaces loaded from a local folder (from_hparams).

Each test writes a tiny model folder as SpeechBrain publishes them (hyperparams.yaml
with a ``pretrainer`` + one ``<loadable>.ckpt`` per loadable), loads it with the
interface's own ``from_hparams(source=<folder>)``, and quantizes it with the
interface's public methods as the forward loop and a task error against the FP32
interface's outputs as the objective.
"""
import pytest
import torch
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.inference.ASR import EncoderASR
from speechbrain.inference.classifiers import EncoderClassifier
from speechbrain.inference.enhancement import SpectralMaskEnhancement
from speechbrain.inference.speaker import SpeakerRecognition

import esc_plugin as esc
from esc_plugin.metrics import char_error_rate
from esc_plugin.speechbrain import quantize_interface

FEATURES = """
n_mels: 24
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
"""

ECAPA = FEATURES + """
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [32, 32, 32, 32, 96]
    attention_channels: 16
    lin_neurons: 16
"""


def hparams_yaml(body, modules, loadables):
    """``body`` + the ``modules`` dict and the ``pretrainer`` listing ``loadables`` (all by !ref)."""
    def refs(names, indent):
        return "".join(f"{' ' * indent}{n}: !ref <{n}>\n" for n in names)
    return (body + "modules:\n" + refs(modules, 4)
            + "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n"
            + "    loadables:\n" + refs(loadables, 8))


CLASSIFIER_HPARAMS = hparams_yaml(ECAPA + """
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 16
    out_neurons: 3
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder
""", ["compute_features", "mean_var_norm", "embedding_model", "classifier"],
    ["embedding_model", "classifier", "label_encoder"])

SPEAKER_HPARAMS = hparams_yaml(ECAPA + """
mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False
""", ["compute_features", "mean_var_norm", "embedding_model", "mean_var_norm_emb"], ["embedding_model"])

# CTC ASR: features -> Conv1d -> Linear -> log-softmax over a character vocabulary, greedy decoding.
ASR_HPARAMS = hparams_yaml(FEATURES + """
blank_index: 0
encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    cnn: !new:speechbrain.nnet.CNN.Conv1d
        in_channels: !ref <n_mels>
        out_channels: 32
        kernel_size: 3
    act: !new:torch.nn.LeakyReLU
    ctc_lin: !new:speechbrain.nnet.linear.Linear
        input_size: 32
        n_neurons: 8
    log_softmax: !new:speechbrain.nnet.activations.Softmax
        apply_log: True
tokenizer: !new:speechbrain.dataio.encoder.CTCTextEncoder
decoding_function: !name:speechbrain.decoders.ctc_greedy_decode
    blank_id: !ref <blank_index>
""", ["encoder"], ["encoder", "tokenizer"])

# As speechbrain/metricgan-plus-voicebank (its EnhancementGenerator has fixed sizes: 257 bins).
ENHANCEMENT_HPARAMS = hparams_yaml("""
compute_stft: !new:speechbrain.processing.features.STFT
    sample_rate: 16000
    win_length: 32
    hop_length: 16
    n_fft: 512
    window_fn: !name:torch.hamming_window
spectral_magnitude: !name:speechbrain.processing.features.spectral_magnitude
    power: 0.5
resynth: !name:speechbrain.processing.signal_processing.resynthesize
    stft: !ref <compute_stft>
    istft: !new:speechbrain.processing.features.ISTFT
        sample_rate: 16000
        win_length: 32
        hop_length: 16
        window_fn: !name:torch.hamming_window
enhance_model: !new:speechbrain.lobes.models.MetricGAN.EnhancementGenerator
""", ["enhance_model"], ["enhance_model"])


def write_model_folder(path, hparams, labels=()):
    """A from_hparams folder as SpeechBrain publishes them: hyperparams.yaml + <loadable>.ckpt.

    Modules are saved with random weights (seed 0); label encoders learn ``labels``
    (a CTC encoder gets its blank first)."""
    from hyperpyyaml import load_hyperpyyaml
    path.mkdir()
    (path / "hyperparams.yaml").write_text(hparams)
    torch.manual_seed(0)
    hp = load_hyperpyyaml(hparams)
    for name, obj in hp["pretrainer"].loadables.items():
        if isinstance(obj, torch.nn.Module):
            torch.save(obj.state_dict(), path / f"{name}.ckpt")
        else:
            if isinstance(obj, CTCTextEncoder):
                obj.insert_blank(index=0)
            obj.update_from_iterable(labels)
            obj.save(path / f"{name}.ckpt")
    return path


def load_interface(cls, folder):
    """``cls.from_hparams`` on the local folder (no network), on CPU."""
    return cls.from_hparams(source=str(folder), savedir=str(folder.parent / "save"), run_opts={"device": "cpu"})


def noise(*shape, seed=1, n=2):
    """``n`` batches of quiet white noise."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 0.1 for _ in range(n)]


def module_types(iface):
    return [(name, type(m)) for name, m in iface.mods.named_modules()]


def check_report(q, fp32, objective):
    """The report lists every Linear/Conv layer of the FP32 interface's modules as quantized, and the
    returned copy scores the objective value the search chose (so it is the calibrated model).
    Returns ``{name: reason}`` of the ops left in float."""
    layers = {n for n, m in fp32.mods.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))}
    names = {c["name"] for c in q.esc_report.quantized_ops}
    assert layers and layers <= names, sorted(layers - names)
    with torch.no_grad():
        assert objective(q) == pytest.approx(q.esc_report.objective["chosen"], rel=1e-6, abs=1e-12)
    return {c["name"]: c["reason"] for c in q.esc_report.coverage if not c["quantized"]}


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread. With two on a busy 2-core machine, an ECAPA forward
    took 1.15 s instead of 0.014 s (thread contention); the speaker test took 38 s instead of 2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def classifier_folder(tmp_path):
    return write_model_folder(tmp_path / "model", CLASSIFIER_HPARAMS, labels=["yes", "no", "up"])


def test_encoder_classifier_from_local_folder(classifier_folder):
    clf = load_interface(EncoderClassifier, classifier_folder)
    types = module_types(clf)
    wavs = noise(2, 4000)
    with torch.no_grad():
        fp32 = [clf.classify_batch(w)[0] for w in wavs]

    def loop(iface):
        for w in wavs:
            iface.classify_batch(w)

    def error(iface):  # disagreement with the FP32 posteriors
        return sum(float((iface.classify_batch(w)[0] - f).pow(2).mean()) for w, f in zip(wavs, fp32))

    q = quantize_interface(clf, esc.QuantConfig(bits=8, method="esc", budget=4, init_grid=8,
                                                         init_max_elements=4096), loop, error, progress=False)
    floats = check_report(q, clf, error)
    # The cosine (AAM) head multiplies by a weight normalised on the fly: listed as float, with the reason.
    assert "classifier" in floats and floats["classifier"]
    with torch.no_grad():
        out_q = q.classify_batch(wavs[0])
        out_fp = clf.classify_batch(wavs[0])
    assert torch.equal(out_fp[0], fp32[0])          # the FP32 interface is untouched
    assert module_types(clf) == types
    assert not torch.equal(out_q[0], out_fp[0])     # the copy is really quantized
    assert out_q[3] and isinstance(out_q[3][0], str)  # still a full interface (label decoding)
    # Measured at W8A8: max |posterior − FP32| 0.0048.
    assert float((out_q[0] - out_fp[0]).abs().max()) < 0.05


def test_encoder_asr_from_local_folder(tmp_path):
    asr = load_interface(EncoderASR, write_model_folder(tmp_path / "model", ASR_HPARAMS, labels=["abcdef g"]))
    assert isinstance(asr.tokenizer, CTCTextEncoder)
    types = module_types(asr)
    wavs, lens = noise(2, 4000), torch.tensor([1.0, 0.75])
    with torch.no_grad():
        fp32_text = [t for w in wavs for t in asr.transcribe_batch(w, lens)[0]]
        fp32_logp = asr.encode_batch(wavs[0], lens)
    assert all(fp32_text) and len(set(fp32_text)) > 1  # real, distinct transcripts to compare with

    def loop(iface):
        for w in wavs:
            iface.transcribe_batch(w, lens)

    def cer(iface):  # CER of the transcripts against the FP32 interface's transcripts
        return char_error_rate(fp32_text, [t for w in wavs for t in iface.transcribe_batch(w, lens)[0]])

    q = quantize_interface(asr, esc.QuantConfig(bits=8, method="esc", budget=8), loop, cer, progress=False)
    check_report(q, asr, cer)
    with torch.no_grad():
        text_q = [t for w in wavs for t in q.transcribe_batch(w, lens)[0]]
        logp_q = q.encode_batch(wavs[0], lens)
        assert torch.equal(asr.encode_batch(wavs[0], lens), fp32_logp)  # the FP32 interface is untouched
    assert module_types(asr) == types
    assert not torch.equal(logp_q, fp32_logp)  # the copy is really quantized
    # Measured at W8A8: log-prob relative error 0.005; CER 0.019 (one inserted character in 52).
    assert relative_error(logp_q, fp32_logp) < 0.05
    assert 0 <= char_error_rate(fp32_text, text_q) <= 0.1
    assert len(text_q) == 4 and all(isinstance(t, str) and t for t in text_q)  # decoded by the tokenizer


def test_speaker_recognition_from_local_folder(tmp_path):
    ver = load_interface(SpeakerRecognition, write_model_folder(tmp_path / "model", SPEAKER_HPARAMS))
    types = module_types(ver)
    enrol, test = noise(2, 4000, seed=2)  # two trials per batch
    with torch.no_grad():
        fp32_score = ver.verify_batch(enrol, test)[0]

    def loop(iface):
        iface.verify_batch(enrol, test)

    def score_error(iface):  # mean |score − FP32 score| over the trials
        return float((iface.verify_batch(enrol, test)[0] - fp32_score).abs().mean())

    q = quantize_interface(ver, esc.QuantConfig(bits=8, method="esc", budget=8, init_grid=8,
                                                init_max_elements=4096), loop, score_error, progress=False)
    check_report(q, ver, score_error)
    with torch.no_grad():
        score_q, decision_q = q.verify_batch(enrol, test)
        assert torch.equal(ver.verify_batch(enrol, test)[0], fp32_score)  # the FP32 interface is untouched
        emb_q, emb_fp = q.encode_batch(enrol), ver.encode_batch(enrol)
    assert module_types(ver) == types
    assert not torch.equal(score_q, fp32_score)  # the copy is really quantized
    # Measured at W8A8: |score − FP32| <= 1.0e-3 (scores ~0.98), embeddings' relative error 0.010.
    assert float((score_q - fp32_score).abs().max()) < 0.01
    assert relative_error(emb_q, emb_fp) < 0.05
    assert decision_q.dtype == torch.bool and decision_q.shape == fp32_score.shape


def test_spectral_mask_enhancement_from_local_folder(tmp_path):
    enh = load_interface(SpectralMaskEnhancement, write_model_folder(tmp_path / "model", ENHANCEMENT_HPARAMS))
    types = module_types(enh)
    noisy, lens = noise(2, 8000, seed=3), torch.tensor([1.0, 0.8])
    with torch.no_grad():
        fp32 = [enh.enhance_batch(x, lengths=lens) for x in noisy]

    def loop(iface):
        for x in noisy:
            iface.enhance_batch(x, lengths=lens)

    def wave_error(iface):  # relative MSE of the enhanced waveforms against the FP32 ones
        return sum(relative_error(iface.enhance_batch(x, lengths=lens), f) ** 2 for x, f in zip(noisy, fp32))

    q = quantize_interface(enh, esc.QuantConfig(bits=8, method="esc", budget=8), loop, wave_error, progress=False)
    floats = check_report(q, enh, wave_error)
    assert any(n.startswith("enhance_model.blstm") and reason for n, reason in floats.items())  # LSTM: float
    with torch.no_grad():
        out_q = q.enhance_batch(noisy[0], lengths=lens)
        assert torch.equal(enh.enhance_batch(noisy[0], lengths=lens), fp32[0])  # the FP32 interface is untouched
    assert module_types(enh) == types
    assert out_q.shape == fp32[0].shape
    assert not torch.equal(out_q, fp32[0])  # the copy is really quantized
    # Measured at W8A8: relative error of the enhanced waveforms 5e-4 (only the mask's two Linear are quantized).
    assert relative_error(out_q, fp32[0]) < 0.005
