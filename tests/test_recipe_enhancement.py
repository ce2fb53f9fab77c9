"""VoiceBank enhancement recipes: data splits, the GTCRN definition, and the spectral-mask recipe end to end.

Runs ``recipes/VoiceBank/enhance/CNNTransformer/train.py`` twice in a subprocess
(real LibriSpeech/LJSpeech speech, real noise, the real VoiceBank+DEMAND
pairs from ``../shared``): once to train and evaluate in FP32, once more with
``--quantize=esc`` on the same output folder, which must recover the FP32
checkpoint without retraining or touching it. Then the saved quantized model
is loaded back in this process and must reproduce the stage's test PESQ.
The GTCRN definition must load the authors' checkpoint with every key and be causal.
"""
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENHANCE = REPO / "recipes" / "VoiceBank" / "enhance"
RECIPE = ENHANCE / "CNNTransformer"
HPARAMS = RECIPE / "hparams" / "CNNTransformer.yaml"
# A tiny model and a few items of every split: the whole test takes well under a minute.
TINY = {"number_of_epochs": 1, "train_select_n": 16, "n_calib": 8, "max_test_synthetic": 2,
        "d_model": 32, "cnn_channels": 32, "num_layers": 1, "d_ffn": 64}


def _run(shared, out, *extra):
    cmd = [sys.executable, str(RECIPE / "train.py"), str(HPARAMS), f"--data_folder={shared / 'data'}",
           f"--output_folder={out}", *[f"--{k}={v}" for k, v in TINY.items()], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"recipe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_splits_are_disjoint(shared, tmp_path):
    prepare = _load_module("voicebank_prepare", ENHANCE / "voicebank_prepare.py")
    data = shared / "data"
    splits = prepare.prepare_voicebank(
        tmp_path, data / "voicebank_demand", data / "librispeech_speakers", data / "sb_samples" / "noise",
        data / "ljspeech" / "wavs")
    manifests = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("train", "calib", "test")}
    assert len(manifests["calib"]) == 100 == splits["calib"]["items"]
    # Only the complete noisy/clean pairs of ../shared (p257_018 has no noisy file).
    assert splits["test"]["voicebank_pairs"] == 5
    speaker = {name: {Path(e["clean"]["file"]).parent.name for e in m.values() if e["source"] != "voicebank"}
               for name, m in manifests.items()}
    assert not (speaker["train"] & speaker["calib"]) and not (speaker["train"] & speaker["test"])
    assert not (speaker["calib"] & speaker["test"]) and len(speaker["calib"]) == 3
    for name, split in (("calib", "calib"), ("test", "test")):  # noise read only from its own part
        for entry in manifests[name].values():
            if entry["noise"] is not None:
                part = splits["noise"][Path(entry["noise"]["file"]).stem][split]
                assert [entry["noise"]["start"], entry["noise"]["stop"]] == part
                assert part[0] <= entry["noise"]["offset"] < part[1]
    for parts in splits["noise"].values():
        assert parts["train"][1] <= parts["calib"][0] < parts["calib"][1] <= parts["test"][0]
    # Re-running with the same options reuses the manifests.
    assert prepare.prepare_voicebank(
        tmp_path, data / "voicebank_demand", data / "librispeech_speakers", data / "sb_samples" / "noise",
        data / "ljspeech" / "wavs") == json.loads((tmp_path / "splits.json").read_text())


def test_gtcrn_loads_the_authors_checkpoint_and_is_causal(shared):
    gtcrn = _load_module("gtcrn", ENHANCE / "GTCRN" / "gtcrn.py")
    model = gtcrn.GTCRN().eval()
    computed_erb = model.erb.erb_fc.weight.detach().clone()
    state = torch.load(shared / "models" / "gtcrn" / "model_trained_on_vctk.tar", map_location="cpu",
                       weights_only=False)["model"]
    model.load_state_dict(state, strict=True)  # every key and shape of the released weights
    assert torch.equal(computed_erb, state["erb.erb_fc.weight"])  # the ERB filterbank as the authors built it
    spec = torch.randn(1, 257, 30, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, head = model(spec), model(spec[:, :, :20])
    assert full.shape == spec.shape
    # Causal: the first 20 frames do not depend on later ones (so it can stream).
    assert torch.allclose(full[:, :, :20], head, atol=1e-5)


def test_enhancement_recipe_trains_quantizes_and_reloads(shared, tmp_path):
    out = tmp_path / "run"
    _run(shared, out)
    save = out / "save"
    before = _digests(save)
    assert any(name.endswith("model.ckpt") for name in before)
    baseline = json.loads((out / "noisy_baseline.json").read_text())
    assert baseline["test"]["items"] == 5 + TINY["max_test_synthetic"]  # the 5 VoiceBank pairs in ../shared
    assert 1.0 < baseline["test"]["pesq_voicebank"] < 4.7

    _run(shared, out, "--quantize=esc", "--quantization={budget: 6, n_samples: 8}")
    assert _digests(save) == before, "the FP32 checkpoint changed"
    epochs = [line for line in (out / "train_log.txt").read_text().splitlines() if line.startswith("Epoch: ")]
    assert len(epochs) == 1, "the second run retrained instead of recovering the checkpoint"

    folder = out / "quantized" / "esc_w8a8"
    for name in ("quantized.pt", "report.json", "metrics.json"):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "report.json").read_text())
    quantized = {c["name"] for c in report["coverage"] if c["quantized"]}
    d = TINY["d_model"]
    attention = "model.encoder.layers.0.self_att.att.in_proj_weight"
    expected = {"model.custom_emb_module.conv1.conv", "model.custom_emb_module.conv2.conv",
                f"{attention}[0:{d}]", f"{attention}[{d}:{2 * d}]", f"{attention}[{2 * d}:{3 * d}]",
                "model.encoder.layers.0.self_att.att.out_proj.weight",
                "model.encoder.layers.0.pos_ffn.ffn.0", "model.encoder.layers.0.pos_ffn.ffn.3",
                "model.output_layer.w"}
    assert expected <= quantized, sorted(expected - quantized)
    assert report["config"]["budget"] == 6 and report["timings"]["n_evaluations"] >= 6
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["objective_name"] == "pesq_metric"
    for key in ("pesq", "stoi", "pesq_voicebank", "stoi_voicebank"):
        assert math.isfinite(metrics["quantized"][key]) and math.isfinite(metrics["fp32"][key]), key
    # PESQ is maximised: the stage's objective is the negated average.
    assert metrics["quantized"]["pesq_metric_objective"] == pytest.approx(-metrics["quantized"]["pesq"])

    # The saved quantized model, rebuilt on a Brain made from the FP32 checkpoint,
    # gives the very outputs the stage evaluated (same test PESQ, to float precision).
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml
    from esc_plugin.speechbrain import bound_modules, load_quantized

    recipe = _load_module("voicebank_cnntransformer_train", RECIPE / "train.py")
    overrides = dict(TINY, data_folder=str(shared / "data"), output_folder=str(out))
    with open(HPARAMS) as f:
        hparams = load_hyperpyyaml(f, overrides)
    datasets = recipe.dataio_prep(hparams)
    brain = recipe.SpectralMaskBrain(modules=hparams["modules"], hparams=hparams,
                                     checkpointer=hparams["checkpointer"], run_opts={"device": "cpu"})
    brain.checkpointer.recover_if_possible(min_key="loss")
    qmodules = load_quantized(brain, str(folder))
    loader = brain.make_dataloader(datasets["test"], sb.Stage.TEST, ckpt_prefix=None,
                                   **hparams["test_dataloader_opts"])
    batch = next(iter(loader))
    brain.modules.eval()
    qmodules.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the recipe run (OMP_NUM_THREADS=1): same float summation order
    try:
        with torch.no_grad():
            fp32_wav = brain.compute_forward(batch, sb.Stage.TEST)[1]
            brain.on_stage_start(sb.Stage.TEST)
            with bound_modules(brain, qmodules):
                q_wav = brain.compute_forward(batch, sb.Stage.TEST)[1]
                for b in loader:
                    brain.compute_objectives(brain.compute_forward(b, sb.Stage.TEST), b, sb.Stage.TEST)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(fp32_wav, q_wav), "the loaded model is not quantized"
    assert brain.pesq_metric.summarize("average") == pytest.approx(metrics["quantized"]["pesq"], abs=1e-9)
    assert _digests(save) == before
