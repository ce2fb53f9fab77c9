#!/usr/bin/env python3
"""Recipe: the pretrained honk res8-narrow keyword spotter as a SpeechBrain
Brain: FP32 evaluation on the Speech Commands test split, then (optionally)
its low-bit quantization with esc_plugin. Nothing is trained: the weights
are loaded from ``pretrained_path`` (never written), the model and its MFCC
front end come from ``esc_plugin.tasks.honk``.

The file is called ``train.py`` like every recipe, so that the same commands
drive all of them::

    python train.py hparams/res8_narrow.yaml --data_folder=../shared/data/speech_commands \\
        --pretrained_path=../shared/models/honk/res8_narrow.pt --quantize=esc

Authors
 * esc_plugin contributors
"""
import os
import sys

import speechbrain as sb
import torch
import torch.nn.functional as F
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.logger import get_logger

from esc_plugin.metrics import mean_average_precision
from esc_plugin.speechbrain import quantize_brain

# The shared speech_commands_prepare.py sits two folders up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from speech_commands_prepare import prepare_speech_commands  # noqa: E402

logger = get_logger(__name__)


class PretrainedKeywordSpotter(sb.Brain):
    """honk MFCCs -> res8 -> class logits; error rate (ClassificationStats) and mAP."""

    def compute_forward(self, batch, stage):
        """Waveforms -> (batch, 12) logits."""
        batch = batch.to(self.device)
        wavs, _ = batch.sig
        return self.modules.res8(self.hparams.compute_features(wavs))

    def compute_objectives(self, predictions, batch, stage):
        """Cross-entropy (reported only), predictions and scores for the metrics."""
        targets = batch.label_encoded.data.squeeze(-1)
        decode = self.label_encoder.decode_ndim
        self.classification_stats.append(batch.id, predictions=decode(predictions.argmax(-1)),
                                         targets=decode(targets))
        self.class_scores.append(predictions.softmax(-1).detach().cpu())
        self.class_targets.append(targets.cpu())
        return F.cross_entropy(predictions, targets)

    def on_stage_start(self, stage, epoch=None):
        """Fresh trackers for every evaluation pass."""
        self.classification_stats = self.hparams.classification_stats()
        self.class_scores, self.class_targets = [], []

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log loss, error rate, accuracy and mAP (percent); keep them in ``test_stats``."""
        accuracy = self.classification_stats.summarize("accuracy")
        mean_ap = mean_average_precision(
            torch.cat(self.class_scores), torch.cat(self.class_targets), num_classes=len(self.label_encoder)
        )
        stats = {"loss": stage_loss, "error_rate": 100.0 * (1.0 - accuracy),
                 "accuracy": 100.0 * accuracy, "mAP": 100.0 * mean_ap}
        if stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(stats_meta={"pretrained": self.hparams.pretrained_path},
                                                test_stats=stats)
            self.test_stats = {k: float(v) for k, v in stats.items()}
            if sb.utils.distributed.if_main_process():
                with open(self.hparams.stats_file, "w") as w:
                    self.classification_stats.write_stats(w)


def dataio_prepare(hparams):
    """Calibration / test datasets with ``sig`` (1 s, zero-padded) and ``label_encoded``."""
    label_encoder = sb.dataio.encoder.CategoricalEncoder()
    label_encoder.load_or_create(
        path=os.path.join(hparams["save_folder"], "label_encoder.txt"),
        from_iterables=[hparams["labels"]],
    )
    label_encoder.expect_len(len(hparams["labels"]))

    def load(json_key, n):
        data = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=hparams[json_key], replacements={"data_root": hparams["data_folder"]}
        )
        return data.filtered_sorted(select_n=n) if n else data

    datasets = [load("calib_json", None), load("test_json", hparams.get("n_test"))]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        sig = sb.dataio.dataio.read_audio(wav)[:16000]
        return F.pad(sig, (0, 16000 - len(sig)))

    @sb.utils.data_pipeline.takes("label")
    @sb.utils.data_pipeline.provides("label_encoded")
    def label_pipeline(label):
        return label_encoder.encode_sequence_torch([label])

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, label_pipeline)
    sb.dataio.dataset.set_output_keys(datasets, ["id", "sig", "label_encoded"])
    return datasets, label_encoder


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    run_on_main(
        prepare_speech_commands,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["prepare_folder"],
            "labels": hparams["labels"],
            "n_calib": hparams["n_calib"],
            "test_fraction": hparams["test_fraction"],
            "seed": hparams["split_seed"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    os.makedirs(hparams["save_folder"], exist_ok=True)
    (calib_data, test_data), label_encoder = dataio_prepare(hparams)

    kws_brain = PretrainedKeywordSpotter(modules=hparams["modules"], hparams=hparams, run_opts=run_opts)
    kws_brain.label_encoder = label_encoder

    kws_brain.evaluate(test_data, test_loader_kwargs=hparams["test_dataloader_opts"])
    quantize_brain(kws_brain, hparams, calib_set=calib_data, test_set=test_data,
                   loader_kwargs=hparams["test_dataloader_opts"])
