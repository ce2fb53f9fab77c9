"""End to end: the LibriSpeech speaker-verification recipes (ECAPA-TDNN trained
here, pretrained GE2E) with tiny settings, then `--quantize=esc`.

Real Speech Commands / LibriSpeech audio and Resemblyzer weights from
../shared; real SpeechBrain Brain, dataloaders, Checkpointer, Pretrainer and
MetricStats. The recipes run as subprocesses, exactly as a user runs them; the
GE2E run overlaps the two ECAPA runs (CI has 2 cores and each run is mostly
single-threaded imports).
"""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import speechbrain as sb
import torch

from conftest import shared_root

REPO = Path(__file__).resolve().parents[1]
SPEAKER_REC = REPO / "recipes" / "LibriSpeech" / "SpeakerRec"
ESC_TINY = ["--quantize=esc", "--quantization={budget: 6, n_samples: 8}"]
TINY_TRIALS = ["--n_test_trials=8", "--max_trial_seconds=2"]
ECAPA_TINY = [
    "--number_of_epochs=1", "--max_speakers=4", "--max_clips_per_speaker=8", "--out_n_neurons=4",
    "--channels=[16, 16, 16, 16, 48]", "--attention_channels=8", "--emb_dim=16", "--batch_size=8",
] + TINY_TRIALS


def start_recipe(model, args, log):
    """Start recipes/LibriSpeech/SpeakerRec/<model>/train.py <model>.yaml <args> in the background."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(SPEAKER_REC / model / "train.py"),
               str(SPEAKER_REC / model / "hparams" / f"{model}.yaml")] + args
    handle = open(log, "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT), handle, log


def finish(run):
    process, handle, log = run
    try:
        code = process.wait(timeout=900)
    finally:
        handle.close()
    assert code == 0, Path(log).read_text()[-6000:]


def digests(folder):
    from esc_plugin.speechbrain.saved import file_digest
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ECAPA: train (quantize none), then the same command with --quantize=esc; GE2E: --quantize=esc."""
    root = shared_root()
    if not (root / "data").is_dir():
        pytest.skip(f"real data not found at {root}: set ESC_SHARED to the shared/ folder")
    base = tmp_path_factory.mktemp("speaker")
    pretrained = root / "models" / "resemblyzer" / "pretrained.pt"
    from esc_plugin.speechbrain.saved import file_digest
    pretrained_digest = file_digest(pretrained)
    ecapa_args = [f"--data_folder={root / 'data'}", f"--output_folder={base / 'ecapa'}"] + ECAPA_TINY
    ge2e_args = [f"--data_folder={root / 'data'}", f"--pretrained_path={pretrained}",
                 f"--output_folder={base / 'ge2e'}"] + TINY_TRIALS

    ge2e = start_recipe("ge2e", ge2e_args + ESC_TINY, base / "ge2e.log")
    try:
        finish(start_recipe("ecapa", ecapa_args, base / "ecapa_train.log"))
        ecapa_fp32_log = (base / "ecapa" / "train_log.txt").read_text()
        ecapa_fp32_digests = digests(base / "ecapa" / "save")
        # Same output folder: the Checkpointer recovers the trained model and training is skipped.
        finish(start_recipe("ecapa", ecapa_args + ESC_TINY, base / "ecapa_esc.log"))
    finally:
        finish(ge2e)
    return types.SimpleNamespace(
        base=base, ecapa_args=ecapa_args, ge2e_args=ge2e_args, ecapa_fp32_log=ecapa_fp32_log,
        ecapa_fp32_digests=ecapa_fp32_digests, pretrained=pretrained, pretrained_digest=pretrained_digest,
    )


def load_recipe(model, monkeypatch, args):
    """The recipe's module (Brain class, dataset builders) and hparams, as train.py builds them."""
    from hyperpyyaml import load_hyperpyyaml
    monkeypatch.syspath_prepend(str(SPEAKER_REC / model))
    spec = importlib.util.spec_from_file_location(f"speaker_recipe_{model}", SPEAKER_REC / model / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    yaml_file = SPEAKER_REC / model / "hparams" / f"{model}.yaml"
    _, _, overrides = sb.parse_arguments([str(yaml_file)] + args)
    with open(yaml_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    return recipe, hparams


def read_quantized_folder(folder):
    """report.json, metrics.json and the coverage of a folder written by quantize_brain."""
    for name in ("quantized.pt", "report.json", "metrics.json"):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "report.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["objective_name"] == "verification_stats"
    # EER+gaussian_EER: positive even when the calibration trials are perfectly separated.
    assert metrics["calibration_objective"]["fp32"] > 0
    for stats in (metrics["fp32"], metrics["quantized"]):  # brain.test_stats of each evaluation
        assert set(stats) >= {"EER", "minDCF", "EER_threshold"} and 0 <= stats["EER"] <= 100
    assert report["config"]["budget"] == 6 and report["config"]["n_samples"] == 8
    quantized = {c["name"] for c in report["coverage"] if c["quantized"]}
    left_float = {c["name"]: c["reason"] for c in report["coverage"] if not c["quantized"]}
    return metrics, quantized, left_float


def evaluate_trials(recipe, brain_cls, hparams, modules_folder=None):
    """Evaluate the test trials in this process, FP32 or with load_quantized(modules_folder)."""
    from esc_plugin.speechbrain import bound_modules, load_quantized
    _, test_data = recipe.trial_datasets(hparams)
    brain = brain_cls(modules=hparams["modules"], hparams=hparams, run_opts={"device": "cpu"})
    brain.on_evaluate_start = lambda max_key=None, min_key=None: None  # weights are loaded by the caller
    qmodules = load_quantized(brain, str(modules_folder)) if modules_folder else brain.modules
    with bound_modules(brain, qmodules):
        brain.evaluate(test_data, test_loader_kwargs=hparams["test_dataloader_opts"], progressbar=False)
    return brain.test_stats


def test_ecapa_recipe_trains_tests_and_quantizes(runs, monkeypatch):
    out = runs.base / "ecapa"
    assert runs.ecapa_fp32_log.count("epoch: 1") == 1 and "test EER" in runs.ecapa_fp32_log
    log = (out / "train_log.txt").read_text()
    assert log.count("epoch: 1") == 1, "the second run trained again instead of recovering the checkpoint"
    assert digests(out / "save") == runs.ecapa_fp32_digests  # FP32 checkpoint untouched by quantization
    assert any(name.endswith("embedding_model.ckpt") for name in runs.ecapa_fp32_digests)
    counts = json.loads((out / "manifests" / "trials_options.json").read_text())["counts"]
    assert counts["calibration"]["target_trials"] == counts["calibration"]["nontarget_trials"] == 50
    assert counts["calibration"]["utterances"] == counts["test"]["utterances"] == 50

    folder = out / "quantized" / "esc_w8a8"
    metrics, quantized, left_float = read_quantized_folder(folder)
    recipe, hparams = load_recipe("ecapa", monkeypatch, runs.ecapa_args)
    # ECAPA-TDNN: every Conv1d (TDNN, Res2Net, SE, MFA, attentive pooling, final fc) is quantized.
    convs = {f"embedding_model.{name}" for name, m in hparams["embedding_model"].named_modules()
             if isinstance(m, torch.nn.Conv1d)}
    assert len(convs) == 38 and convs <= quantized
    assert any(".norm" in name for name in left_float)  # BatchNorm stays float, with a reason

    hparams["checkpointer"].recover_if_possible(min_key="ErrorRate")
    fp32 = evaluate_trials(recipe, recipe.SpeakerBrain, hparams)
    assert fp32 == pytest.approx({k: metrics["fp32"][k] for k in fp32}, abs=1e-6)
    reloaded = evaluate_trials(recipe, recipe.SpeakerBrain, hparams, folder)
    assert reloaded == pytest.approx({k: metrics["quantized"][k] for k in reloaded}, abs=1e-6)
    assert reloaded["EER_threshold"] != pytest.approx(fp32["EER_threshold"], abs=1e-9)


def test_ge2e_recipe_measures_and_quantizes(runs, monkeypatch):
    from esc_plugin.speechbrain.saved import file_digest
    assert file_digest(runs.pretrained) == runs.pretrained_digest
    folder = runs.base / "ge2e" / "quantized" / "esc_w8a8"
    metrics, quantized, left_float = read_quantized_folder(folder)
    # Only the Linear layer is quantized; the LSTM is listed as left in float.
    assert quantized == {"embedding_model.linear"}
    assert any(name.startswith("embedding_model.lstm") for name in left_float)

    recipe, hparams = load_recipe("ge2e", monkeypatch, runs.ge2e_args)
    hparams["pretrainer"].collect_files()
    hparams["pretrainer"].load_collected()
    fp32 = evaluate_trials(recipe, recipe.GE2EBrain, hparams)
    assert fp32 == pytest.approx({k: metrics["fp32"][k] for k in fp32}, abs=1e-6)
    reloaded = evaluate_trials(recipe, recipe.GE2EBrain, hparams, folder)
    assert reloaded == pytest.approx({k: metrics["quantized"][k] for k in reloaded}, abs=1e-6)
