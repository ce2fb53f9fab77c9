"""End to end: the Speech Commands recipes (Conformer-CTC ASR, AST keyword spotter,
pretrained honk res8-narrow), tiny configs, real clips from ``../shared``.

Each recipe runs once in a subprocess, all three side by side, exactly as a
user would: ``train.py <yaml> --quantize=esc --quantization="{budget: 6,
n_samples: 8}"`` (train tiny -> FP32 test -> ESC -> quantized test). Then,
in this process, a Brain is built from the same hparams and

* re-running the recipe's ``fit`` recovers the checkpoint instead of training;
* the FP32 test metrics are reproduced (the FP32 checkpoint still holds the
  weights that produced them), and the quantization stage leaves every FP32
  checkpoint file byte-identical;
* the saved quantized model, put back with ``load_quantized``, reproduces the
  stage's quantized test metrics and differs from the FP32 model.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "SpeechCommands"
KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
QUANTIZE_ESC = ["--quantize=esc", "--quantization={budget: 6, n_samples: 8}"]

# Tiny models and a few clips: each recipe runs in seconds (plus its imports).
RECIPE_SETUPS = {
    "asr": {
        "folder": RECIPES / "ASR" / "conformer_ctc", "yaml": "conformer_ctc.yaml",
        "tiny": {"number_of_epochs": 1, "n_train": 16, "n_test": 8, "batch_size": 16, "d_model": 32,
                 "nhead": 2, "num_encoder_layers": 1, "d_ffn": 64, "cnn_channels": 8},
    },
    "ast": {
        "folder": RECIPES / "KWS" / "ast", "yaml": "ast.yaml",
        "tiny": {"number_of_epochs": 1, "n_train": 16, "n_test": 8, "batch_size": 16, "d_model": 32,
                 "nhead": 2, "num_layers": 1, "d_ffn": 64},
    },
    "honk": {
        "folder": RECIPES / "KWS" / "honk_res8", "yaml": "res8_narrow.yaml",
        "tiny": {"n_test": 8, "batch_size": 16},
    },
}


def _arguments(name, shared, out):
    setup = RECIPE_SETUPS[name]
    args = {"data_folder": shared / "data" / "speech_commands", "output_folder": out, **setup["tiny"]}
    if name == "honk":
        args["pretrained_path"] = shared / "models" / "honk" / "res8_narrow.pt"
    return [str(setup["folder"] / "hparams" / setup["yaml"])] + [f"--{k}={v}" for k, v in args.items()]


def _digests(paths):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths) if p.is_file()}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """Run the three recipes end to end, in parallel subprocesses; ``{name: (shared, output folder)}``."""
    shared = Path(os.environ.get("ESC_SHARED", REPO.parent / "shared"))
    if not (shared / "data" / "speech_commands").is_dir():
        pytest.skip(f"Speech Commands clips not found under {shared}: set ESC_SHARED to the shared/ folder")
    honk_weights = shared / "models" / "honk" / "res8_narrow.pt"
    before = _digests([honk_weights])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs, runs = {}, {}
    try:
        for name, setup in RECIPE_SETUPS.items():
            out = tmp_path_factory.mktemp(name)
            cmd = [sys.executable, str(setup["folder"] / "train.py"), *_arguments(name, shared, out), *QUANTIZE_ESC]
            # Output to a file, not a pipe: a full pipe would block a recipe while we wait on another.
            with open(out.parent / f"{name}.log", "w") as log:
                procs[name] = (out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        for name, (out, proc) in procs.items():
            proc.wait(timeout=600)
            log = (out.parent / f"{name}.log").read_text()
            assert proc.returncode == 0, f"{name} recipe failed:\n{log[-6000:]}"
            runs[name] = (shared, out)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert _digests([honk_weights]) == before, "the pretrained honk weights changed"
    return runs


def _load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"speech_commands_{name}_train",
                                                  RECIPE_SETUPS[name]["folder"] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name, shared, out):
    """The recipe's Brain and datasets, built in this process from the same hparams."""
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    recipe = _load_recipe(name)
    hparams_file, run_opts, overrides = sb.parse_arguments(_arguments(name, shared, out))
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    run_opts = {"device": "cpu"}
    if name == "asr":
        tokenizer = recipe.build_tokenizer(hparams)
        train, calib, test = recipe.dataio_prepare(hparams, tokenizer)
        brain = recipe.ASR(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                           run_opts=run_opts, checkpointer=hparams["checkpointer"])
        brain.tokenizer = tokenizer
    elif name == "ast":
        (train, calib, test), encoder = recipe.dataio_prepare(hparams)
        brain = recipe.KeywordSpotter(modules=hparams["modules"], opt_class=hparams["opt_class"],
                                      hparams=hparams, run_opts=run_opts, checkpointer=hparams["checkpointer"])
        brain.label_encoder = encoder
    else:
        (calib, test), encoder = recipe.dataio_prepare(hparams)
        train = None
        brain = recipe.PretrainedKeywordSpotter(modules=hparams["modules"], hparams=hparams, run_opts=run_opts)
        brain.label_encoder = encoder
    return brain, hparams, train, calib, test


def _first_test_output(brain, test, hparams):
    import speechbrain as sb

    # brain.evaluate adds ckpt_prefix to the options dict it was given.
    opts = {k: v for k, v in hparams["test_dataloader_opts"].items() if k != "ckpt_prefix"}
    loader = brain.make_dataloader(test, sb.Stage.TEST, ckpt_prefix=None, **opts)
    brain.modules.eval()
    with torch.no_grad():
        out = brain.compute_forward(next(iter(loader)), sb.Stage.TEST)
    return out[0] if isinstance(out, tuple) else out


def _check_recipe(name, recipe_runs, expected_quantized, metric_keys):
    from esc_plugin.speechbrain import bound_modules, load_quantized, quantize_brain

    shared, out = recipe_runs[name]
    folder = out / "quantized" / "esc_w8a8"
    for artefact in ("quantized.pt", "report.json", "metrics.json"):
        assert (folder / artefact).is_file(), artefact
    report = json.loads((folder / "report.json").read_text())
    quantized = {c["name"] for c in report["coverage"] if c["quantized"]}
    assert expected_quantized <= quantized, sorted(expected_quantized - quantized)
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in metric_keys:  # percent; WER / CER may exceed 100 (insertions)
        assert 0.0 <= metrics["fp32"][key] < 1e3 and 0.0 <= metrics["quantized"][key] < 1e3, key

    brain, hparams, train, calib, test = _build(name, shared, out)
    fp32_files = list((out / "save").rglob("*"))
    before = _digests(fp32_files)
    if train is not None:  # what the recipe does on a re-run: recover, do not train again
        log = (out / "train_log.txt").read_text()
        brain.fit(brain.hparams.epoch_counter, train, calib,
                  train_loader_kwargs=hparams["train_dataloader_opts"],
                  valid_loader_kwargs=hparams["valid_dataloader_opts"])
        assert (out / "train_log.txt").read_text() == log, "re-running the recipe trained again"
    loader_kwargs = hparams["test_dataloader_opts"]
    brain.evaluate(test, test_loader_kwargs=loader_kwargs, progressbar=False)
    for key in metric_keys + ["loss"]:
        assert brain.test_stats[key] == pytest.approx(metrics["fp32"][key], rel=1e-5, abs=1e-6), key
    fp32_output = _first_test_output(brain, test, hparams)

    # The stage itself (here with the cheap `max` calibrator) never writes the FP32 files.
    result = quantize_brain(brain, dict(hparams, quantize="max", quantization={"n_samples": 8}),
                            calib_set=calib, test_set=None, loader_kwargs=loader_kwargs, progress=False)
    assert Path(result.folder) == out / "quantized" / "max_w8a8"
    assert _digests(fp32_files) == before, "quantization changed the FP32 checkpoint"

    # The saved ESC model, rebuilt on the FP32 Brain, reproduces the stage's quantized test metrics.
    qmodules = load_quantized(brain, str(folder))
    with bound_modules(brain, qmodules):
        brain.evaluate(test, test_loader_kwargs=loader_kwargs, progressbar=False)
        q_output = _first_test_output(brain, test, hparams)
    for key in metric_keys + ["loss"]:
        assert brain.test_stats[key] == pytest.approx(metrics["quantized"][key], rel=1e-5, abs=1e-6), key
    assert not torch.equal(fp32_output, q_output), "the loaded model is not quantized"
    assert _digests(fp32_files) == before


def test_conformer_ctc_recipe(recipe_runs):
    # RelPosMHAXL applies its packed in_proj_weight with F.linear (one call site: self-attention).
    layer = "Transformer.encoder.layers.0"
    expected = {f"{layer}.mha_layer.in_proj_weight", f"{layer}.mha_layer.out_proj", f"{layer}.mha_layer.linear_pos",
                f"{layer}.convolution_module.conv", f"{layer}.ffn_module1.1.ffn.0", "CNN.convblock_0.convs.conv_0.conv",
                "Transformer.custom_src_module.layers.0.w", "ctc_lin.w"}
    _check_recipe("asr", recipe_runs, expected, ["WER", "CER"])
    # The ASR manifests hold only the ten keyword classes, each transcribed by its word.
    manifest = json.loads((recipe_runs["asr"][1] / "manifests" / "test.json").read_text())
    assert all(e["words"] == e["label"] for e in manifest.values())
    assert {e["label"] for e in manifest.values()} == set(KEYWORDS)


def test_ast_recipe(recipe_runs):
    # SpeechBrain hands nn.MultiheadAttention separate q, k, v tensors: three in_proj call sites.
    d, att = RECIPE_SETUPS["ast"]["tiny"]["d_model"], "ast.encoder.layers.0.self_att.att"
    expected = {"ast.patch_embedding", f"{att}.in_proj_weight[0:{d}]", f"{att}.in_proj_weight[{d}:{2 * d}]",
                f"{att}.in_proj_weight[{2 * d}:{3 * d}]", f"{att}.out_proj.weight",
                "ast.encoder.layers.0.pos_ffn.ffn.0", "ast.encoder.norm.norm", "ast.head"}
    _check_recipe("ast", recipe_runs, expected, ["error_rate", "accuracy", "mAP"])


def test_honk_res8_recipe(recipe_runs):
    expected = {f"res8.conv{i}" for i in range(7)} | {"res8.output"}
    _check_recipe("honk", recipe_runs, expected, ["error_rate", "accuracy", "mAP"])


def test_speech_commands_split_is_speaker_disjoint(recipe_runs):
    for name in ("asr", "ast"):
        folder = recipe_runs[name][1] / "manifests"
        speakers = {split: {e["spk_id"] for e in json.loads((folder / f"{split}.json").read_text()).values()}
                    for split in ("train", "calib", "test")}
        assert len(json.loads((folder / "calib.json").read_text())) == 100
        assert not speakers["train"] & speakers["calib"]
        assert not speakers["train"] & speakers["test"]
        assert not speakers["calib"] & speakers["test"]
