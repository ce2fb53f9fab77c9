#!/usr/bin/env python3
"""Recipe: train a small ECAPA-TDNN speaker embedding, test it on LibriSpeech
verification trials, then (optionally) quantize it with ESC.

Training: speaker classification with an additive-angular-margin softmax
(as SpeechBrain's VoxCeleb recipe) over the Speech Commands speakers.
Test: cosine scoring of LibriSpeech trials (speakers never seen in training),
EER (%) and minDCF (normalized, p_target = 0.01).
Quantization: calibration items are trials; the stage optimises
``EER+gaussian_EER`` of the calibration trials (see README.md).

To run:
    python train.py hparams/ecapa.yaml --data_folder=../../../../../shared/data
    python train.py hparams/ecapa.yaml --data_folder=../../../../../shared/data --quantize=esc

Re-running with the same output folder recovers the trained checkpoint and
skips training.
"""
import os
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main

from esc_plugin.speechbrain import quantize_brain
from librispeech_prepare import prepare_verification_trials  # symlink to ../librispeech_prepare.py
from speaker_clips_prepare import prepare_speech_commands_speakers
from verification import cosine_scores, embed_trials, trial_datasets  # symlink to ../verification.py


class SpeakerBrain(sb.core.Brain):
    """Speaker classification for TRAIN / VALID; verification trials for TEST."""

    def compute_forward(self, batch, stage):
        """TRAIN/VALID: classifier outputs of single clips; TEST: embeddings of both trial sides."""
        batch = batch.to(self.device)
        if stage == sb.Stage.TEST:
            return embed_trials(batch, self.embed_utterances)
        wavs, lens = batch.sig
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "wav_augment"):
            wavs, lens = self.hparams.wav_augment(wavs, lens)
        embeddings = self.embed(wavs, lens)
        return self.modules.classifier(embeddings), lens

    def embed(self, wavs, lens):
        """Fbank -> sentence mean normalization -> ECAPA-TDNN, shape (batch, 1, emb_dim)."""
        feats = self.modules.compute_features(wavs)
        feats = self.modules.mean_var_norm(feats, lens)
        return self.modules.embedding_model(feats, lens)

    def embed_utterances(self, wavs):
        """Embeddings (n, emb_dim) of n unpadded utterances, one at a time (their lengths differ)."""
        ones = torch.ones(1, device=wavs[0].device)
        return torch.cat([self.embed(wav.unsqueeze(0), ones).reshape(1, -1) for wav in wavs])

    def compute_objectives(self, predictions, batch, stage):
        """AAM-softmax loss (TRAIN/VALID); TEST appends the trials' cosine scores."""
        if stage == sb.Stage.TEST:
            scores = cosine_scores(*predictions)
            self.verification_stats.append(batch.id, scores, batch.label.float())
            # Verification has no per-trial loss; EER/minDCF come from the stats at stage end.
            return torch.zeros((), device=scores.device)
        predictions, lens = predictions
        spkid, _ = batch.spk_id_encoded
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "wav_augment"):
            spkid = self.hparams.wav_augment.replicate_labels(spkid)
        loss = self.hparams.compute_cost(predictions, spkid, lens)
        if stage == sb.Stage.VALID:
            self.error_metrics.append(batch.id, predictions, spkid, lens)
        return loss

    def on_stage_start(self, stage, epoch=None):
        """One metric tracker per stage: classification error (VALID) or EER/minDCF (TEST)."""
        self.error_metrics = self.hparams.error_stats() if stage == sb.Stage.VALID else None
        self.verification_stats = self.hparams.verification_stats() if stage == sb.Stage.TEST else None

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log, anneal the learning rate and checkpoint (VALID); store test_stats (TEST)."""
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
        elif stage == sb.Stage.VALID:
            stats = {"loss": stage_loss, "ErrorRate": self.error_metrics.summarize("average")}
            old_lr, new_lr = self.hparams.lr_annealing(epoch)
            sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": old_lr}, train_stats=self.train_stats, valid_stats=stats
            )
            self.checkpointer.save_and_keep_only(meta={"ErrorRate": stats["ErrorRate"]}, min_keys=["ErrorRate"])
        else:
            summary = self.verification_stats.summarize()
            self.test_stats = {k: summary[k] for k in ("EER", "minDCF", "EER_threshold")}
            self.hparams.train_logger.log_stats(
                {"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=self.test_stats
            )


def speaker_datasets(hparams):
    """Train / valid speaker-classification datasets and the speaker label encoder."""

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    label_encoder = sb.dataio.encoder.CategoricalEncoder()

    @sb.utils.data_pipeline.takes("spk_id")
    @sb.utils.data_pipeline.provides("spk_id_encoded")
    def label_pipeline(spk_id):
        return torch.LongTensor([label_encoder.encode_label(spk_id)])

    datasets = [
        sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=hparams[key],
            replacements={"data_root": hparams["train_folder"]},
            dynamic_items=[audio_pipeline, label_pipeline],
            output_keys=["id", "sig", "spk_id_encoded"],
        )
        for key in ("train_annotation", "valid_annotation")
    ]
    label_encoder.load_or_create(
        path=os.path.join(hparams["save_folder"], "label_encoder.txt"),
        from_didatasets=[datasets[0]],
        output_key="spk_id",
    )
    if len(label_encoder) != hparams["out_n_neurons"]:
        raise ValueError(
            f"The training manifest has {len(label_encoder)} speakers but the classifier has "
            f"out_n_neurons={hparams['out_n_neurons']}: pass --out_n_neurons={len(label_encoder)}."
        )
    return datasets[0], datasets[1], label_encoder


def prepare_data(hparams):
    """Speech Commands speaker manifests and LibriSpeech trials (on the main process only)."""
    run_on_main(
        prepare_speech_commands_speakers,
        kwargs={
            "data_folder": hparams["train_folder"],
            "save_folder": hparams["manifest_folder"],
            "min_clips_per_speaker": hparams["min_clips_per_speaker"],
            "valid_every": hparams["valid_every"],
            "max_speakers": hparams["max_speakers"],
            "max_clips_per_speaker": hparams["max_clips_per_speaker"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    run_on_main(
        prepare_verification_trials,
        kwargs={
            "data_folder": hparams["trials_folder"],
            "save_folder": hparams["manifest_folder"],
            "n_calib_trials": hparams["n_calib_trials"],
            "n_test_trials": hparams["n_test_trials"],
            "utterances_per_speaker": hparams["utterances_per_speaker"],
            "seed": hparams["trials_seed"],
            "skip_prep": hparams["skip_prep"],
        },
    )


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    prepare_data(hparams)
    train_data, valid_data, _ = speaker_datasets(hparams)
    calib_data, test_data = trial_datasets(hparams)

    brain = SpeakerBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        brain.hparams.epoch_counter,
        train_data,
        valid_data,
        train_loader_kwargs=hparams["dataloader_options"],
        valid_loader_kwargs=hparams["valid_dataloader_options"],
    )
    brain.evaluate(test_data, min_key="ErrorRate", test_loader_kwargs=hparams["test_dataloader_opts"])
    quantize_brain(
        brain, hparams, calib_set=calib_data, test_set=test_data, loader_kwargs=hparams["test_dataloader_opts"],
        calib_loader_kwargs=hparams.get("calib_dataloader_opts"),
    )
