"""Quantizing a SpeechBrain pretrained interface loaded from a local folder (from_hparams)."""
import pytest
import torch
from speechbrain.inference.classifiers import EncoderClassifier

import esc_plugin as esc
from esc_plugin.speechbrain import quantize_interface

HPARAMS = """
n_mels: 24
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [32, 32, 32, 32, 96]
    attention_channels: 16
    lin_neurons: 16
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 16
    out_neurons: 3
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    classifier: !ref <classifier>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
"""


@pytest.fixture
def classifier_folder(tmp_path):
    """A from_hparams folder as SpeechBrain publishes them: hyperparams.yaml + *.ckpt."""
    from hyperpyyaml import load_hyperpyyaml
    src = tmp_path / "model"
    src.mkdir()
    (src / "hyperparams.yaml").write_text(HPARAMS)
    torch.manual_seed(0)
    hp = load_hyperpyyaml(HPARAMS)
    torch.save(hp["embedding_model"].state_dict(), src / "embedding_model.ckpt")
    torch.save(hp["classifier"].state_dict(), src / "classifier.ckpt")
    enc = hp["label_encoder"]
    enc.update_from_iterable(["yes", "no", "up"])
    enc.save(src / "label_encoder.ckpt")
    return src


def test_encoder_classifier_from_local_folder(classifier_folder, tmp_path):
    clf = EncoderClassifier.from_hparams(source=str(classifier_folder), savedir=str(tmp_path / "save"),
                                         run_opts={"device": "cpu"})
    g = torch.Generator().manual_seed(1)
    wavs = [torch.randn(2, 4000, generator=g) * 0.1 for _ in range(2)]
    with torch.no_grad():
        fp32 = [clf.classify_batch(w)[0] for w in wavs]

    def loop(iface):
        for w in wavs:
            iface.classify_batch(w)

    def error(iface):  # disagreement with the FP32 posteriors
        return sum(float((iface.classify_batch(w)[0] - f).pow(2).mean()) for w, f in zip(wavs, fp32))

    q = quantize_interface(clf, esc.QuantConfig(bits=8, method="esc", budget=4, init_grid=8,
                                                         init_max_elements=4096), loop, error, progress=False)
    names = {c["name"] for c in q.esc_report.quantized_ops}
    assert any(n.startswith("embedding_model.blocks.0") for n in names)
    assert "embedding_model.fc.conv" in names
    floats = {c["name"]: c["reason"] for c in q.esc_report.coverage if not c["quantized"]}
    # The cosine (AAM) head multiplies by a weight normalised on the fly: listed as float, with the reason.
    assert "classifier" in floats and floats["classifier"]
    with torch.no_grad():
        out_q = q.classify_batch(wavs[0])
        out_fp = clf.classify_batch(wavs[0])
    assert torch.equal(out_fp[0], fp32[0])          # the FP32 interface is untouched
    assert not torch.equal(out_q[0], out_fp[0])     # the copy is really quantized
    assert out_q[3] and isinstance(out_q[3][0], str)  # still a full interface (label decoding)
    assert float((out_q[0] - out_fp[0]).abs().max()) < 1.0
