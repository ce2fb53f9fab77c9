#!/usr/bin/env python3
"""Spectral-mask speech enhancement (CNN + transformer), trained on the fly, evaluated on VoiceBank+DEMAND.

The model sees log(1 + |STFT|) of a noisy waveform and predicts a mask in
[0, 1] per time-frequency bin; the masked log-magnitude is mapped back to a
magnitude and resynthesised with the noisy phase (as SpeechBrain's Voicebank
``spectral_mask`` recipe). Training mixtures are made on the fly from clean
speech windows and real noise recordings at random SNRs and levels;
calibration and test mixtures are fixed by the manifests (see
``../voicebank_prepare.py``). Test: the VoiceBank+DEMAND pairs plus mixtures of
held-out speakers. Metrics: wideband PESQ and STOI.

After the usual FP32 test evaluation the recipe runs the quantization stage
(``quantize: none`` by default; ``--quantize=esc`` to calibrate, see README.md).

To run this recipe (from the repository root)::

    python recipes/VoiceBank/enhance/CNNTransformer/train.py \
        recipes/VoiceBank/enhance/CNNTransformer/hparams/CNNTransformer.yaml \
        --data_folder=../shared/data

Authors
 * esc_plugin contributors 2025 (after the SpeechBrain Voicebank spectral_mask recipe)
"""
import logging
import os
import sys

import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.processing.features import spectral_magnitude
from speechbrain.utils.distributed import run_on_main

from esc_plugin.speechbrain import quantize_brain

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from enhancement_common import EnhancementBrain, dataio_prep, noisy_baseline, prepare_kwargs  # noqa: E402
from voicebank_prepare import prepare_voicebank  # noqa: E402

logger = logging.getLogger(__name__)


class SpectralMaskBrain(EnhancementBrain):
    """Mask estimation on log-magnitude spectra; PESQ / STOI from :class:`EnhancementBrain`."""

    def compute_feats(self, wavs):
        """log(1 + |STFT|), shape (batch, frames, n_fft // 2 + 1)."""
        feats = self.hparams.compute_STFT(wavs)
        feats = spectral_magnitude(feats, power=0.5)
        return torch.log1p(feats)

    def compute_forward(self, batch, stage):
        """Noisy waveform -> (masked log-magnitude, enhanced waveform)."""
        batch = batch.to(self.device)
        noisy_wavs, lens = batch.noisy_sig
        noisy_feats = self.compute_feats(noisy_wavs)
        # Padded frames must not be attended to, so a padded batch gives the same
        # output as items run one by one.
        frames = noisy_feats.shape[1]
        padding = ~length_to_mask(torch.round(lens * frames), max_len=frames).bool()
        mask = self.modules.model(noisy_feats, src_key_padding_mask=padding)
        predict_spec = torch.mul(mask, noisy_feats)
        predict_wav = self.hparams.resynth(torch.expm1(predict_spec), noisy_wavs)
        return predict_spec, predict_wav

    def compute_objectives(self, predictions, batch, stage):
        """MSE on log-magnitudes (masked by length); PESQ / STOI at test."""
        predict_spec, predict_wav = predictions
        clean_wavs, lens = batch.clean_sig
        clean_spec = self.compute_feats(clean_wavs)
        loss = self.hparams.compute_cost(predict_spec, clean_spec, lens)
        self.track_metrics(batch, predict_wav, clean_wavs, lens, stage)
        return loss


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    run_on_main(prepare_voicebank, kwargs=prepare_kwargs(hparams))
    datasets = dataio_prep(hparams)
    baseline = noisy_baseline({"calib": datasets["calib"], "test": datasets["test"]},
                              hparams["noisy_baseline_file"])
    logger.info("Noisy input (no enhancement): %s", baseline)

    se_brain = SpectralMaskBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    se_brain.fit(
        epoch_counter=se_brain.hparams.epoch_counter,
        train_set=datasets["train"],
        valid_set=datasets["calib"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["test_dataloader_opts"],
    )
    se_brain.evaluate(
        test_set=datasets["test"],
        min_key="loss",
        test_loader_kwargs=hparams["test_dataloader_opts"],
    )
    quantize_brain(se_brain, hparams, calib_set=datasets["calib"], test_set=datasets["test"],
                   loader_kwargs=hparams["test_dataloader_opts"])
