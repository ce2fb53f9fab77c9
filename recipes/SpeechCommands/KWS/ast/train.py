#!/usr/bin/env python3
"""Recipe: a small Audio Spectrogram Transformer keyword spotter on Speech
Commands (12 classes), trained from scratch, then (optionally) its low-bit
quantization with esc_plugin.

Fbank (64 mels, 101 frames per 1 s clip) -> global mean/variance
normalisation -> overlapping 16x16 patches (Conv2d) + [CLS] + position
embeddings -> SpeechBrain TransformerEncoder -> Linear. Metrics: the
classification error from SpeechBrain's ClassificationStats (the quantization
objective) and the macro mean average precision (esc_plugin.metrics).

To run this recipe::

    python train.py hparams/ast.yaml --data_folder=../shared/data/speech_commands

and to quantize the trained model (the training is recovered from the
checkpoint, not repeated)::

    python train.py hparams/ast.yaml --data_folder=../shared/data/speech_commands \\
        --quantize=esc --quantization="{bits: 4}"

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

# The model (audio_spectrogram_transformer.py) sits beside this file; the
# shared speech_commands_prepare.py two folders up.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from speech_commands_prepare import prepare_speech_commands  # noqa: E402

logger = get_logger(__name__)


class KeywordSpotter(sb.Brain):
    """Log-mel features -> AST -> class logits; cross-entropy; error rate and mAP."""

    def compute_forward(self, batch, stage):
        """Waveforms -> (batch, classes) logits."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "fea_augment"):
            feats, _ = self.hparams.fea_augment(feats, wav_lens)
        return self.modules.ast(feats)

    def compute_objectives(self, predictions, batch, stage):
        """Cross-entropy; on the evaluation stages also the predictions and scores."""
        targets = batch.label_encoded.data.squeeze(-1)
        smoothing = self.hparams.label_smoothing if stage == sb.Stage.TRAIN else 0.0
        loss = F.cross_entropy(predictions, targets, label_smoothing=smoothing)
        if stage != sb.Stage.TRAIN:
            decode = self.label_encoder.decode_ndim
            self.classification_stats.append(
                batch.id, predictions=decode(predictions.argmax(-1)), targets=decode(targets)
            )
            self.class_scores.append(predictions.softmax(-1).detach().cpu())
            self.class_targets.append(targets.cpu())
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Fresh trackers for every evaluation pass."""
        if stage != sb.Stage.TRAIN:
            self.classification_stats = self.hparams.classification_stats()
            self.class_scores, self.class_targets = [], []

    def summary(self):
        """Error rate, accuracy and macro mAP of the current pass, in percent."""
        accuracy = self.classification_stats.summarize("accuracy")
        mean_ap = mean_average_precision(
            torch.cat(self.class_scores), torch.cat(self.class_targets), num_classes=len(self.label_encoder)
        )
        return {"error_rate": 100.0 * (1.0 - accuracy), "accuracy": 100.0 * accuracy, "mAP": 100.0 * mean_ap}

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log loss and metrics; checkpoint after validation; keep the test summary."""
        stage_stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            return
        stage_stats.update(self.summary())
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]},
                train_stats=self.train_stats,
                valid_stats=stage_stats,
            )
            self.checkpointer.save_and_keep_only(meta={"error_rate": stage_stats["error_rate"]}, num_to_keep=1)
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stage_stats,
            )
            self.test_stats = {k: float(v) for k, v in stage_stats.items()}
            if sb.utils.distributed.if_main_process():
                with open(self.hparams.stats_file, "w") as w:
                    self.classification_stats.write_stats(w)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """The Noam schedule advances with every optimizer step."""
        if should_step:
            self.hparams.noam_annealing(self.optimizer)


def dataio_prepare(hparams):
    """Train / calibration / test datasets with ``sig`` (1 s, zero-padded) and ``label_encoded``."""
    label_encoder = sb.dataio.encoder.CategoricalEncoder()
    label_encoder.load_or_create(
        path=os.path.join(hparams["save_folder"], "label_encoder.txt"),
        from_iterables=[hparams["labels"]],
    )
    label_encoder.expect_len(len(hparams["labels"]))

    def load(json_key, n_key):
        data = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=hparams[json_key], replacements={"data_root": hparams["data_folder"]}
        )
        n = hparams.get(n_key) if n_key else None
        return data.filtered_sorted(select_n=n) if n else data

    datasets = [load("train_json", "n_train"), load("calib_json", None), load("test_json", "n_test")]
    clip_samples = hparams["clip_samples"]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        sig = sb.dataio.dataio.read_audio(wav)[:clip_samples]
        return F.pad(sig, (0, clip_samples - len(sig)))

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
    (train_data, calib_data, test_data), label_encoder = dataio_prepare(hparams)

    kws_brain = KeywordSpotter(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    kws_brain.label_encoder = label_encoder

    # The calibration split doubles as the validation set (disjoint from
    # training and test); the checkpoint kept is the last one (no selection).
    kws_brain.fit(
        kws_brain.hparams.epoch_counter,
        train_data,
        calib_data,
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )

    kws_brain.evaluate(test_data, test_loader_kwargs=hparams["test_dataloader_opts"])
    quantize_brain(kws_brain, hparams, calib_set=calib_data, test_set=test_data,
                   loader_kwargs=hparams["test_dataloader_opts"])
