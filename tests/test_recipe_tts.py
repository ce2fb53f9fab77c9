"""End to end: the LJSpeech FastSpeech2 recipe trains, re-runs from its checkpoint and quantizes.

Runs ``recipes/LJSpeech/TTS/fastspeech2/train.py`` twice with a tiny model on
the transcribed LJSpeech clips of ``../shared``: once FP32 (train + test), once
with ``--quantize=esc`` on the same output folder, which must recover the
checkpoint instead of training, leave the FP32 files untouched and write the
quantized model; the saved model is then loaded back into a fresh Brain.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "LJSpeech" / "TTS" / "fastspeech2"

# A few-second training: 4 clips, 2 epochs, a 130 k-parameter model; 2 calibration, 2 test clips.
TINY = {
    "epochs": 2, "batch_size": 2, "n_calib": 2, "n_test": 2,
    "hidden_channels": 32, "enc_num_layers": 1, "dec_num_layers": 1,
    "enc_ffn_dim": 32, "dec_ffn_dim": 32, "attn_channels": 8,
    "postnet_embedding_dim": 32, "postnet_n_convolutions": 3,
}


def run_recipe(shared, out, *extra):
    args = [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams" / "fastspeech2.yaml"),
            f"--data_folder={shared / 'data' / 'ljspeech'}", f"--output_folder={out}"]
    args += [f"--{k}={v}" for k, v in TINY.items()] + list(extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(args, cwd=str(RECIPE), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load_brain(shared, out):
    """A Brain built from the recipe's hparams and its FP32 checkpoint, plus its datasets."""
    from hyperpyyaml import load_hyperpyyaml
    import speechbrain as sb

    overrides = {"data_folder": str(shared / "data" / "ljspeech"), "output_folder": str(out), **TINY}
    sys.path.insert(0, str(RECIPE))  # train.py and the model class the YAML names
    try:
        import train as recipe
        with open(RECIPE / "hparams" / "fastspeech2.yaml") as f:
            hparams = load_hyperpyyaml(f, overrides)
    finally:
        sys.path.remove(str(RECIPE))
    datasets = recipe.dataio_prepare(hparams)
    brain = recipe.FastSpeech2Brain(modules=hparams["modules"], hparams=hparams,
                                    run_opts={"device": "cpu"}, checkpointer=hparams["checkpointer"])
    brain.checkpointer.recover_if_possible(min_key="total_mel_loss")
    brain.modules.eval()
    return brain, hparams, datasets, sb


def test_fastspeech2_recipe_trains_recovers_and_quantizes(shared, tmp_path):
    out = tmp_path / "run"
    run_recipe(shared, out)
    splits = json.loads((out / "manifests" / "splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "calib": 2, "test": 2}
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["calib"]) & set(splits["test"])
    log = (out / "train_log.txt").read_text()
    assert log.count("epoch:") == 2 and "test total_mel_loss" in log
    fp32_files = digests(out / "save")

    run_recipe(shared, out, "--quantize=esc", "--quantization={budget: 6, bits: 8}")
    # Re-run recovered the checkpoint: no new training epoch, FP32 checkpoint byte-identical.
    assert (out / "train_log.txt").read_text().count("epoch:") == 2
    assert digests(out / "save") == fp32_files
    folder = out / "quantized" / "esc_w8a8"
    for name in ("quantized.pt", "report.json", "metrics.json"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["objective_name"] == "mel_metric"
    for key in ("mel_loss", "postnet_mel_loss", "total_mel_loss"):
        assert metrics["fp32"][key] > 0 and metrics["quantized"][key] > 0
    report = json.loads((folder / "report.json").read_text())
    quantized = {c["name"] for c in report["coverage"] if c["quantized"]}
    # Attention in_proj / out_proj (F.linear), 1-D conv FFNs, aligner and PostNet convs, mel projection.
    expected = {"model.encoder.layers.0.self_att.att.in_proj_weight[0:32]",
                "model.decoder.layers.0.self_att.att.out_proj.weight",
                "model.encoder.layers.0.pos_ffn.0.conv", "model.decoder.layers.0.pos_ffn.2.conv",
                "model.aligner.query_layer.0.conv", "model.postnet.conv_pre.conv", "model.linear.w",
                "model.decoder.norm.norm"}
    assert expected <= quantized, sorted(quantized)

    # The saved quantized model, loaded into a Brain built from the FP32 checkpoint, reproduces
    # the stage's test metrics and differs from FP32.
    from esc_plugin.speechbrain import bound_modules, load_quantized

    brain, hparams, datasets, sb = load_brain(shared, out)
    qmodules = load_quantized(brain, str(folder))
    loader = brain.make_dataloader(datasets["test"], sb.Stage.TEST, **hparams["test_dataloader_opts"])
    batch = next(iter(loader))
    with torch.no_grad():
        fp32_out = brain.compute_forward(batch, sb.Stage.TEST)
        with bound_modules(brain, qmodules):
            q_out = brain.compute_forward(batch, sb.Stage.TEST)
            brain.on_stage_start(sb.Stage.TEST)
            brain.compute_objectives(q_out, batch, sb.Stage.TEST)
    q_total = brain.mel_metric.summarize("average")
    assert q_total == pytest.approx(metrics["quantized"]["total_mel_loss"], rel=1e-5)
    assert not torch.equal(q_out[1], fp32_out[1])
