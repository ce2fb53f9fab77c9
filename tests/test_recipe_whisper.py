"""End to end: the SpeechBrain Whisper recipe (``recipes/Transcribed/ASR/whisper``)
with Whisper tiny.en from ``../shared``, tiny: one LibriSpeech calibration
utterance labelled by the FP32 model, one transcribed test clip, ESC budget 4.

The recipe runs once in a subprocess, as a user would (``train.py <yaml>
--quantize=esc --quantization="{budget: 4, n_samples: 1}"``: FP32 labels of
the calibration set -> FP32 test -> ESC on the WER against FP32 -> quantized
test). Then, in this process, a Brain is built from the same hparams and the
saved quantized model, put back with ``load_quantized``, reproduces the
stage's quantized test metrics (WER and NLL) and differs from the FP32
model; the FP32 weights are byte-identical before and after.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "Transcribed" / "ASR" / "whisper"
TINY = {"n_calib": 1, "n_test": 1}
QUANTIZE_ESC = ["--quantize=esc", "--quantization={budget: 4, n_samples: 1}"]


def _shared():
    return Path(os.environ.get("ESC_SHARED", REPO.parent / "shared"))


def _arguments(shared, out):
    args = {"data_folder": shared / "data", "whisper_source": shared / "models" / "whisper-tiny.en",
            "output_folder": out, **TINY}
    return [str(RECIPE / "hparams" / "whisper.yaml")] + [f"--{k}={v}" for k, v in args.items()]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    shared = _shared()
    weights = shared / "models" / "whisper-tiny.en" / "model.safetensors"
    if not (shared / "data" / "librispeech_speakers").is_dir() or not weights.is_file():
        pytest.skip(f"LibriSpeech clips or Whisper tiny.en not found under {shared}: set ESC_SHARED")
    before = _digest(weights)
    out = tmp_path_factory.mktemp("whisper")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(RECIPE / "train.py"), *_arguments(shared, out), *QUANTIZE_ESC],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"whisper recipe failed:\n{proc.stdout[-6000:]}"
    assert _digest(weights) == before, "the FP32 Whisper weights changed"
    return shared, out, weights, before


def _build(shared, out):
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    spec = importlib.util.spec_from_file_location("whisper_recipe_train", RECIPE / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    hparams_file, _, overrides = sb.parse_arguments(_arguments(shared, out))
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    brain = recipe.build_brain(hparams, {"device": "cpu"})
    test = recipe.dataio_prepare(hparams, hparams["whisper"].tokenizer, hparams["test_json"], hparams["n_test"])
    return brain, hparams, test


def test_whisper_recipe(recipe_run):
    from esc_plugin.speechbrain import bound_modules, load_quantized

    shared, out, weights, before = recipe_run
    folder = out / "quantized" / "esc_w8a8"
    for artefact in ("quantized.pt", "report.json", "metrics.json"):
        assert (folder / artefact).is_file(), artefact

    # Calibration and test share no clip and no speaker; the calibration words are FP32 transcripts.
    labelled = json.loads((out / "manifests" / "calib_fp32_labels.json").read_text())
    test_manifest = json.loads((out / "manifests" / "test.json").read_text())
    assert len(labelled) == 1 and len(test_manifest) == 18
    assert all(e["words"].strip() for e in labelled.values())
    assert not {e["spk_id"] for e in labelled.values()} & {e["spk_id"] for e in test_manifest.values()}

    # Every Linear / Conv1d / LayerNorm of encoder and decoder is quantized (attention projections
    # included); the vocabulary projection (a matmul on the embedding table) stays in float.
    report = json.loads((folder / "report.json").read_text())
    quantized = {c["name"] for c in report["coverage"] if c["quantized"]}
    expected = {"whisper.model.encoder.conv1", "whisper.model.encoder.conv2"}
    for part, attentions in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        for i in range(4):
            layer = f"whisper.model.{part}.layers.{i}"
            expected |= {f"{layer}.{att}.{proj}" for att in attentions for proj in ("q_proj", "k_proj", "v_proj",
                                                                                   "out_proj")}
            expected |= {f"{layer}.fc1", f"{layer}.fc2", f"{layer}.final_layer_norm"}
    assert expected <= quantized, sorted(expected - quantized)
    assert "whisper" in {c["name"] for c in report["coverage"] if not c["quantized"]}

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["objective_name"] == "wer_metric"
    assert metrics["calibration_objective"]["fp32"] == 0.0  # FP32 agrees with its own transcripts
    assert 0.0 <= metrics["fp32"]["WER"] <= 100.0 and metrics["quantized"]["WER"] >= 0.0

    # The saved model, rebuilt on a Brain loaded from the FP32 weights, reproduces the stage's test metrics.
    brain, hparams, test = _build(shared, out)
    qmodules = load_quantized(brain, str(folder))
    with bound_modules(brain, qmodules):
        brain.evaluate(test, test_loader_kwargs=hparams["test_dataloader_opts"], progressbar=False)
    for key in ("WER", "loss"):
        assert brain.test_stats[key] == pytest.approx(metrics["quantized"][key], rel=1e-5, abs=1e-6), key
    # ... and it is not the FP32 model: the teacher-forced NLL of the reference moved.
    assert brain.test_stats["loss"] != pytest.approx(metrics["fp32"]["loss"], rel=1e-4)
    assert _digest(weights) == before
