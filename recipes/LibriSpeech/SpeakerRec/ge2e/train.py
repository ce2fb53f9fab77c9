#!/usr/bin/env python3
"""Recipe: the pretrained GE2E speaker encoder (Resemblyzer) on LibriSpeech
verification trials, then (optionally) quantized with ESC.

Nothing is trained: the Pretrainer loads ``pretrained_path`` into the encoder
(``save_folder`` only gets a link to it). Test: cosine scoring of the trials,
EER (%) and minDCF (normalized, p_target = 0.01). Quantization: calibration
items are trials; the stage optimises ``EER+gaussian_EER`` of the calibration
trials (see README.md). Only the encoder's Linear layer is quantized: the LSTM
stays in float (the quantizer covers Linear / Conv / LayerNorm inputs), which
the coverage report lists.

To run:
    python train.py hparams/ge2e.yaml --data_folder=../../../../../shared/data \
        --pretrained_path=../../../../../shared/models/resemblyzer/pretrained.pt [--quantize=esc]
"""
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import run_on_main

from esc_plugin.speechbrain import quantize_brain
from librispeech_prepare import prepare_verification_trials  # symlink to ../librispeech_prepare.py
from verification import cosine_scores, embed_trials, trial_datasets  # symlink to ../verification.py


class GE2EBrain(sb.core.Brain):
    """Embeds both sides of verification trials with the GE2E encoder (TEST only)."""

    def compute_forward(self, batch, stage):
        """Embeddings of the enrolment and test utterances of each trial."""
        batch = batch.to(self.device)
        return embed_trials(batch, self.embed_utterances)

    def embed_utterances(self, wavs):
        """Per utterance: mean of its partial-window embeddings, L2-normalised; shape (n, 256).

        The windows of all utterances have the same size, so they go through
        the LSTM as one batch (much faster on CPU than one utterance at a time).
        """
        windows = [self.modules.compute_features(wav) for wav in wavs]
        partial = self.modules.embedding_model(torch.cat(windows))
        means = torch.stack([p.mean(dim=0) for p in partial.split([len(w) for w in windows])])
        return means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def compute_objectives(self, predictions, batch, stage):
        """Appends the trials' cosine scores; there is no per-trial loss."""
        scores = cosine_scores(*predictions)
        self.verification_stats.append(batch.id, scores, batch.label.float())
        return scores.new_zeros(())

    def on_stage_start(self, stage, epoch=None):
        """A fresh EER/minDCF tracker for each evaluation."""
        self.verification_stats = self.hparams.verification_stats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log EER / minDCF and keep them in ``self.test_stats``."""
        summary = self.verification_stats.summarize()
        self.test_stats = {k: summary[k] for k in ("EER", "minDCF", "EER_threshold")}
        self.hparams.train_logger.log_stats({"model": "GE2E (pretrained)"}, test_stats=self.test_stats)


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
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
    calib_data, test_data = trial_datasets(hparams)

    run_on_main(hparams["pretrainer"].collect_files)
    hparams["pretrainer"].load_collected()

    brain = GE2EBrain(modules=hparams["modules"], hparams=hparams, run_opts=run_opts)
    brain.evaluate(test_data, test_loader_kwargs=hparams["test_dataloader_opts"])
    quantize_brain(
        brain, hparams, calib_set=calib_data, test_set=test_data, loader_kwargs=hparams["test_dataloader_opts"]
    )
