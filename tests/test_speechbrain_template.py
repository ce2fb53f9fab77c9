"""The stage on a Brain shaped like SpeechBrain's own speaker-id template (templates/speaker_id):
hparams from hyperpyyaml, ``error_stats: !name:MetricStats {metric: !name:classification_error}``
plus a ``loss_metric`` MetricStats over ``nll_loss``, test metrics only logged (no
``brain.test_stats``), and the one documented line with no ``metric:`` option."""
import functools
import json
import os

import pytest
import torch
import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.metric_stats import MetricStats

from esc_plugin.core.errors import ConfigError
from esc_plugin.speechbrain import quantize_brain
from esc_plugin.speechbrain.saved import file_digest

N_CLASSES, DIM = 4, 16

YAML = """
output_folder: !PLACEHOLDER
save_folder: !ref <output_folder>/save
train_log: !ref <output_folder>/train_log.txt
error_stats: !name:speechbrain.utils.metric_stats.MetricStats
    metric: !name:speechbrain.nnet.losses.classification_error
        reduction: batch
train_logger: !new:speechbrain.utils.train_logger.FileTrainLogger
    save_file: !ref <train_log>
epoch_counter: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 3
dataloader_options:
    batch_size: 8
embedding_model: !new:torch.nn.Linear
    in_features: 16
    out_features: 32
classifier: !new:torch.nn.Linear
    in_features: 32
    out_features: 4
modules:
    embedding_model: !ref <embedding_model>
    classifier: !ref <classifier>
opt_class: !name:torch.optim.Adam
    lr: 0.01
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: !ref <save_folder>
    recoverables:
        embedding_model: !ref <embedding_model>
        classifier: !ref <classifier>
        counter: !ref <epoch_counter>
quantize: esc
quantization:
    bits: 8
    budget: 4
    n_samples: 24
"""


class SpkIdBrain(sb.Brain):
    """The template's Brain, with a linear embedding model on vector features."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        feats, _ = batch.feats
        embeddings = torch.relu(self.modules.embedding_model(feats))
        return torch.log_softmax(self.modules.classifier(embeddings), -1).unsqueeze(1)

    def compute_objectives(self, predictions, batch, stage):
        lens = torch.ones(predictions.shape[0], device=self.device)
        spkid = batch.label.to(self.device).unsqueeze(1)
        loss = sb.nnet.losses.nll_loss(predictions, spkid, lens)
        self.loss_metric.append(batch.id, predictions, spkid, lens, reduction="batch")
        if stage != sb.Stage.TRAIN:
            self.error_metrics.append(batch.id, predictions, spkid, lens)
        return loss

    def on_stage_start(self, stage, epoch=None):
        self.loss_metric = MetricStats(metric=sb.nnet.losses.nll_loss)
        if stage != sb.Stage.TRAIN:
            self.error_metrics = self.hparams.error_stats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_loss = stage_loss
            return
        stats = {"loss": stage_loss, "error": self.error_metrics.summarize("average")}
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats({"epoch": epoch}, train_stats={"loss": self.train_loss},
                                                valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta=stats, min_keys=["error"])
        if stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats({"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(N_CLASSES, DIM, generator=torch.Generator().manual_seed(0)) * 2
    data = {f"utt{seed}_{i}": {"feats": centres[i % N_CLASSES] + torch.randn(DIM, generator=g),
                               "label": i % N_CLASSES} for i in range(n)}
    ds = DynamicItemDataset(data)
    ds.set_output_keys(["id", "feats", "label"])
    return ds


@pytest.fixture
def template(tmp_path):
    torch.manual_seed(0)
    hparams = load_hyperpyyaml(YAML, {"output_folder": str(tmp_path / "results")})
    spk_id_brain = SpkIdBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                              run_opts={"device": "cpu"}, checkpointer=hparams["checkpointer"])
    spk_id_brain.fit(epoch_counter=spk_id_brain.hparams.epoch_counter, train_set=make_data(64, 1),
                     valid_set=make_data(16, 2), train_loader_kwargs=hparams["dataloader_options"],
                     valid_loader_kwargs=hparams["dataloader_options"], progressbar=False)
    test_data = make_data(40, 3)
    spk_id_brain.evaluate(test_set=test_data, min_key="error", test_loader_kwargs=hparams["dataloader_options"],
                          progressbar=False)
    return spk_id_brain, hparams, test_data, tmp_path / "results"


def digests(folder):
    return {os.path.relpath(os.path.join(r, f), folder): file_digest(os.path.join(r, f))
            for r, _, fs in os.walk(folder) for f in fs}


def test_template_brain_needs_no_metric_option(template):
    spk_id_brain, hparams, test_data, out = template
    fp32_error = float(spk_id_brain.error_metrics.summarize("average"))  # the recipe's FP32 test pass
    assert "test_stats" not in vars(spk_id_brain)  # the template only logs its test stats
    fp32_files = digests(out)
    valid_data = make_data(30, 4)

    result = quantize_brain(spk_id_brain, hparams, calib_set=valid_data, test_set=test_data,
                            loader_kwargs=hparams["dataloader_options"], progress=False)

    metrics = json.loads((out / "quantized" / "esc_w8a8" / "metrics.json").read_text())
    assert metrics["objective_name"] == "error_metrics" and metrics["higher_is_better"] is False
    notes = " | ".join(result.report.notes)
    assert "chosen over the loss tracker(s) ['loss_metric']" in notes
    assert "lower is better (inferred" in notes and "classification_error" in notes
    # FP32 test metrics are there (they were null): evaluated again, equal to the recipe's own pass.
    assert metrics["fp32"]["error"] == pytest.approx(fp32_error)
    assert metrics["fp32"]["error_metrics_objective"] == pytest.approx(fp32_error)
    assert {"loss", "error", "error_metrics_objective"} <= set(metrics["quantized"])
    assert metrics["quantized"]["error"] <= fp32_error + 0.1
    assert "test_stats" not in vars(spk_id_brain)
    # Every FP32 file (checkpoint, train_log) is byte-identical.
    assert {k: v for k, v in digests(out).items() if not k.startswith("quantized")} == fp32_files


def test_unknown_direction_names_the_metric(template):
    spk_id_brain, hparams, test_data, out = template

    def pesq_like(pred, target, lens):
        return torch.zeros(pred.shape[0])

    spk_id_brain.hparams.error_stats = functools.partial(MetricStats, metric=pesq_like)
    with pytest.raises(ConfigError, match=r"the metric 'error_metrics' \(MetricStats over .*pesq_like\) "
                                          r".*higher_is_better: true"):
        quantize_brain(spk_id_brain, hparams, calib_set=make_data(30, 4), test_set=test_data,
                       loader_kwargs=hparams["dataloader_options"], progress=False)
    assert not (out / "quantized").exists()
    hparams["quantization"]["higher_is_better"] = True  # said in the YAML: accepted
    result = quantize_brain(spk_id_brain, hparams, calib_set=make_data(30, 4),
                            loader_kwargs=hparams["dataloader_options"], progress=False)
    assert result.metrics["higher_is_better"] is True
