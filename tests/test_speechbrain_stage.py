"""The SpeechBrain stage with a real Brain, DynamicItemDataset, Checkpointer and MetricStats."""
import json
import os

import pytest
import torch
import speechbrain as sb
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.metric_stats import ClassificationStats
from speechbrain.utils.train_logger import FileTrainLogger

from esc_plugin.core.errors import ConfigError
from esc_plugin.speechbrain import bound_modules, load_quantized, quantize_brain
from esc_plugin.speechbrain.saved import file_digest

N_CLASSES, DIM = 4, 16


class ToyBrain(sb.Brain):
    """A standard recipe Brain: metric created in on_stage_start, filled in compute_objectives."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        x, _ = batch.feats
        return self.hparams.model(self.modules.norm(x))  # both access paths, as recipes do

    def compute_objectives(self, logits, batch, stage):
        target = batch.label.to(self.device)
        if stage != sb.Stage.TRAIN:
            self.acc_metric.append(batch.id, logits.argmax(-1).unsqueeze(1), target.unsqueeze(1))
        return torch.nn.functional.cross_entropy(logits, target)

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.acc_metric = ClassificationStats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TEST:
            self.test_stats = {"loss": stage_loss, "accuracy": self.acc_metric.summarize("accuracy")}
            self.hparams.train_logger.log_stats({"test": "done"}, test_stats=self.test_stats)
            with open(self.hparams.wer_file, "w") as f:  # a per-run output file, as recipes write
                f.write(f"accuracy {float(self.test_stats['accuracy']):.6f}\n")


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(N_CLASSES, DIM, generator=torch.Generator().manual_seed(0)) * 3
    data = {}
    for i in range(n):
        label = i % N_CLASSES
        data[f"utt{seed}_{i}"] = {"feats": centres[label] + torch.randn(DIM, generator=g), "label": label}
    ds = DynamicItemDataset(data)
    ds.set_output_keys(["id", "feats", "label"])
    return ds


@pytest.fixture
def trained(tmp_path):
    return train(tmp_path, "save")


def train(tmp_path, ckpt_name):
    """Train, checkpoint and evaluate (FP32) a ToyBrain whose Checkpointer is ``<out>/<ckpt_name>``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Linear(32, N_CLASSES))
    norm = torch.nn.LayerNorm(DIM)
    out = tmp_path / "results"
    ckpt_dir = out / ckpt_name
    hparams = {"model": model, "norm": norm, "output_folder": str(out),
               "train_logger": FileTrainLogger(str(out / "train_log.txt")),
               "wer_file": str(out / "wer_test.txt")}
    brain = ToyBrain(modules={"model": model, "norm": norm},
                     opt_class=lambda p: torch.optim.Adam(p, 1e-2), hparams=hparams,
                     run_opts={"device": "cpu"},
                     checkpointer=Checkpointer(str(ckpt_dir), recoverables={"model": model, "norm": norm}))
    brain.fit(range(3), make_data(64, 1), make_data(16, 2), train_loader_kwargs={"batch_size": 8},
              progressbar=False)
    brain.checkpointer.save_checkpoint()
    test = make_data(40, 3)
    brain.evaluate(test, test_loader_kwargs={"batch_size": 8}, progressbar=False)
    return brain, hparams, test, out


def checkpoint_digests(folder):
    return {p: file_digest(os.path.join(r, p)) for r, _, fs in os.walk(folder) for p in fs}


def test_stage_quantizes_with_the_brains_metric_and_keeps_fp32(trained):
    brain, hparams, test, out = trained
    before = checkpoint_digests(out / "save")
    log_before = (out / "train_log.txt").read_text()
    wer_before = (out / "wer_test.txt").read_text()
    fp32_state = {k: v.clone() for k, v in brain.modules.state_dict().items()}
    fp32_stats = dict(brain.test_stats)
    hparams.update(quantize="esc", quantization={"bits": 8, "budget": 6, "n_samples": 24, "seed": 0})

    result = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                            loader_kwargs={"batch_size": 8}, progress=False)

    folder = out / "quantized" / "esc_w8a8"
    assert result.folder == str(folder)
    for name in ("quantized.pt", "report.json", "metrics.json", "convergence.png", "amax.png"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["objective_name"] == "acc_metric"
    assert metrics["fp32"]["accuracy"] == pytest.approx(fp32_stats["accuracy"])
    # The Brain's test_stats lack the tracker's objective value: FP32 is evaluated again, so every
    # quantized test metric has its FP32 counterpart (the tables compare them).
    assert set(metrics["quantized"]) <= set(metrics["fp32"])
    assert metrics["fp32"]["acc_metric_objective"] == pytest.approx(
        metrics["quantized"]["acc_metric_objective"], abs=0.1)
    assert metrics["quantized"]["accuracy"] >= 0.9
    report = result.report
    # Γ candidates + the mean + the start (the init and the baselines, percentile's own candidates)
    assert len(report.history) == 6 and report.timings["n_evaluations"] <= 6 + 2 + 8
    ops = {c["name"] for c in report.quantized_ops}
    assert {"model.0", "model.2", "norm"} <= ops
    # FP32: checkpoint files, weights, hparams references, test stats and log untouched.
    assert checkpoint_digests(out / "save") == before
    assert all(torch.equal(v, brain.modules.state_dict()[k]) for k, v in fp32_state.items())
    assert hparams["model"] is brain.modules["model"] and brain.hparams.model is brain.modules["model"]
    assert brain.test_stats == fp32_stats
    assert (out / "train_log.txt").read_text() == log_before
    assert (folder / "log.txt").is_file()
    assert (folder / "wer_test.txt").is_file() and (out / "wer_test.txt").read_text() == wer_before

    # Load back through SpeechBrain's Checkpointer: identical outputs.
    reloaded = load_quantized(brain, str(folder))
    x = torch.stack([test[i]["feats"] for i in range(8)])
    with torch.no_grad():
        with bound_modules(brain, result.modules):
            a = brain.compute_forward(_batch(test), sb.Stage.TEST)
        with bound_modules(brain, reloaded):
            b = brain.compute_forward(_batch(test), sb.Stage.TEST)
        fp = brain.compute_forward(_batch(test), sb.Stage.TEST)
    assert torch.equal(a, b)
    assert not torch.equal(a, fp)  # the quantized model really differs from FP32
    assert x.shape[0] == 8


def _batch(ds):
    from speechbrain.dataio.batch import PaddedBatch
    return PaddedBatch([ds[i] for i in range(8)])


def test_quantize_none_does_nothing(trained):
    brain, hparams, test, out = trained
    assert quantize_brain(brain, {**hparams, "quantize": "none"}, make_data(4, 4)) is None
    assert not (out / "quantized").exists()


@pytest.mark.parametrize("change, message", [
    ({"quantize": "int8"}, "not a calibrator"),
    ({"quantization": {"bitz": 8}}, "unknown option"),
    ({"quantization": {"n_samples": 500}}, "calibration set has 30 items"),
    ({"quantization": {"metric": "wer_metric", "n_samples": 8}}, "not a MetricStats attribute"),
    ({"quantization": {"output_folder": "SAVE/inside", "n_samples": 8}}, "inside the FP32 checkpoint folder"),
])
def test_bad_input_fails_before_any_work(trained, change, message):
    brain, hparams, test, out = trained
    change = json.loads(json.dumps(change).replace("SAVE", str(out / "save")))
    hp = {**hparams, "quantize": "esc", **change}
    with pytest.raises(ConfigError, match=message):
        quantize_brain(brain, hp, make_data(30, 4), loader_kwargs={"batch_size": 8}, progress=False)
    assert not (out / "quantized").exists()


def test_brain_without_metric_names_the_fix(trained):
    brain, hparams, test, out = trained

    class NoMetric(ToyBrain):
        def on_stage_start(self, stage, epoch=None):
            pass

        def compute_objectives(self, logits, batch, stage):
            return torch.nn.functional.cross_entropy(logits, batch.label)

    bare = NoMetric(modules=dict(brain.modules.items()), hparams=hparams, run_opts={"device": "cpu"})
    hp = {**hparams, "quantize": "max", "quantization": {"n_samples": 8}}
    with pytest.raises(ConfigError, match="no metric to optimise.*metric: loss"):
        quantize_brain(bare, hp, make_data(8, 4), loader_kwargs={"batch_size": 8}, progress=False)
    hp["quantization"]["metric"] = "loss"
    result = quantize_brain(bare, hp, make_data(8, 4), loader_kwargs={"batch_size": 8}, progress=False)
    assert result.metrics["objective_name"] == "loss"


@pytest.mark.parametrize("layout", ["output_folder", "parent", "checkpoint", "test_log_folder"])
def test_output_layout_touching_fp32_files_is_refused(tmp_path, layout):
    """The FP32 Checkpointer at <output_folder>/checkpoint: a stage folder equal to output_folder
    would run its own Checkpointer.save_and_keep_only(num_to_keep=1) there (deleting the FP32
    checkpoint) and overwrite wer_file. Every such layout is refused before any work."""
    brain, hparams, test, out = train(tmp_path, "checkpoint")
    elsewhere = tmp_path / "logs"
    elsewhere.mkdir()
    (elsewhere / "test_log.txt").write_text("FP32 test log\n")
    hparams["test_log"] = str(elsewhere / "test_log.txt")
    folder = {"output_folder": out, "parent": tmp_path, "checkpoint": out / "checkpoint" / "q",
              "test_log_folder": elsewhere}[layout]
    ckpt_before = checkpoint_digests(out / "checkpoint")
    wer_before = (out / "wer_test.txt").read_bytes()
    files_before = sorted(str(p) for p in tmp_path.rglob("*"))
    hp = {**hparams, "quantize": "esc",
          "quantization": {"output_folder": str(folder), "n_samples": 8, "budget": 2}}
    safe = str(out / "quantized" / "esc_w8a8")
    with pytest.raises(ConfigError, match="not safe") as err:
        quantize_brain(brain, hp, make_data(8, 4), test_set=test, loader_kwargs={"batch_size": 8},
                       progress=False)
    assert safe in str(err.value)
    assert checkpoint_digests(out / "checkpoint") == ckpt_before and len(ckpt_before) > 0
    assert (out / "wer_test.txt").read_bytes() == wer_before
    assert sorted(str(p) for p in tmp_path.rglob("*")) == files_before  # nothing written at all

    # The folder the error names is safe: the FP32 checkpoint and wer_file stay byte-identical.
    hp["quantization"]["output_folder"] = safe
    quantize_brain(brain, hp, make_data(8, 4), test_set=test, loader_kwargs={"batch_size": 8},
                   progress=False)
    assert checkpoint_digests(out / "checkpoint") == ckpt_before
    assert (out / "wer_test.txt").read_bytes() == wer_before
    assert (out / "quantized" / "esc_w8a8" / "wer_test.txt").is_file()


@pytest.mark.parametrize("key, right", [("quantisation", "quantization"), ("quantizaton", "quantization"),
                                        ("Quantization", "quantization"), ("quantise", "quantize")])
def test_misspelt_stage_key_names_the_right_one(trained, key, right):
    brain, hparams, test, out = trained
    hp = {**hparams, "quantize": "esc", key: {"bits": 4}} if right == "quantization" else \
        {**hparams, key: "esc"}
    with pytest.raises(ConfigError, match=f"misspelt '{right}'.*rename it to '{right}'"):
        quantize_brain(brain, hp, make_data(8, 4), loader_kwargs={"batch_size": 8}, progress=False)
    assert not (out / "quantized").exists()


def test_a_module_named_like_the_key_is_not_a_typo(trained):
    brain, hparams, test, out = trained
    # e.g. wav2vec2's `quantiser:` (a module), with quantization off: nothing to complain about.
    hp = {**hparams, "quantiser": torch.nn.Linear(2, 2)}
    assert quantize_brain(brain, hp, make_data(8, 4)) is None


def test_stage_label_free_objective(trained):
    brain, hparams, test, out = trained
    before = checkpoint_digests(out / "save")
    hparams.update(quantize="esc", quantization={"bits": 8, "budget": 6, "n_samples": 24, "seed": 0,
                                                 "objective": "distill"})
    result = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                            loader_kwargs={"batch_size": 8}, progress=False)
    assert result.folder.endswith("esc_distill_w8a8")
    assert any("distillation to the FP32 outputs" in n for n in result.report.notes)
    metrics = json.loads(open(os.path.join(result.folder, "metrics.json")).read())
    assert metrics["quantized"]["accuracy"] >= 0.9 and metrics["calibration_objective"]["quantized"] is not None
    assert checkpoint_digests(out / "save") == before
    hparams.update(quantization={"objective": "labels"})
    with pytest.raises(ConfigError, match="'metric'.*'distill'"):
        quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test, progress=False)


def test_selection_guard_holds_back_a_full_batch_not_the_short_last_one(trained):
    """25 calibration samples in batches of 8 (8, 8, 8, 1): the guard holds back one full batch
    (8 samples, the nearest to 20 %), not the last batch of 1, and the report says so."""
    brain, hparams, test, out = trained
    hparams.update(quantize="esc", quantization={"bits": 8, "budget": 4, "n_samples": 25, "seed": 0,
                                                 "init": "output_mse"})
    result = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                            loader_kwargs={"batch_size": 8}, progress=False)
    assert "selection guard: the objective's split (20% held back: 1 of 4 parts, 8 of 25 samples)" \
        in result.report.notes


def test_calibration_loader_of_its_own_lets_the_guard_split_one_test_batch(trained):
    """The test loader's batch holds every calibration item: the guard is off and the report names
    ``calib_loader_kwargs``; with that smaller calibration batch it holds one batch back."""
    brain, hparams, test, out = trained
    hparams.update(quantize="esc", quantization={"bits": 8, "budget": 4, "n_samples": 20, "seed": 0,
                                                 "init": "output_mse"})
    one = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                         loader_kwargs={"batch_size": 32}, progress=False)
    assert any(n.startswith("selection guard off") for n in one.report.notes)
    assert any("calib_loader_kwargs" in n for n in one.report.notes)
    five = quantize_brain(brain, hparams, calib_set=make_data(30, 4), test_set=test,
                          loader_kwargs={"batch_size": 32}, calib_loader_kwargs={"batch_size": 4}, progress=False)
    assert "selection guard: the objective's split (20% held back: 1 of 5 parts, 4 of 20 samples)" \
        in five.report.notes
    assert not any("calib_loader_kwargs" in n for n in five.report.notes)
