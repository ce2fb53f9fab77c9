#!/usr/bin/env python3
"""GTCRN (pretrained on VCTK-DEMAND by its authors) evaluated on VoiceBank+DEMAND, then quantized.

The network (``gtcrn.py``, 48 k parameters) maps a noisy complex STFT (512
points, hop 256, square-root Hann window) to a complex ratio mask. Its weights
come from the authors' checkpoint (``pretrained_path``, loaded with
``strict=True``); ``number_of_epochs`` is 0, so the recipe only evaluates and
quantizes. With ``--number_of_epochs=N`` it fine-tunes on the same on-the-fly
mixtures as the CNNTransformer recipe (untested here), and a re-run recovers
the fine-tuned checkpoint.

Data, splits and metrics are shared with the CNNTransformer recipe (see
``../voicebank_prepare.py`` and ``../enhancement_common.py``). GTCRN was
trained on the VoiceBank+DEMAND *training* speakers; the test pairs here are
from the test speakers (p232, p257).

To run this recipe (from the repository root)::

    python recipes/VoiceBank/enhance/GTCRN/train.py recipes/VoiceBank/enhance/GTCRN/hparams/GTCRN.yaml \
        --data_folder=../shared/data --pretrained_path=../shared/models/gtcrn/model_trained_on_vctk.tar

Authors
 * esc_plugin contributors 2025
"""
import logging
import os
import sys

import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.utils.distributed import run_on_main

from esc_plugin.speechbrain import quantize_brain

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from enhancement_common import EnhancementBrain, dataio_prep, noisy_baseline, prepare_kwargs  # noqa: E402
from voicebank_prepare import prepare_voicebank  # noqa: E402

logger = logging.getLogger(__name__)


class GTCRNBrain(EnhancementBrain):
    """Complex-mask enhancement with GTCRN; PESQ / STOI from :class:`EnhancementBrain`."""

    def stft(self, wavs):
        """(batch, time) -> (batch, bins, frames, 2), GTCRN's analysis."""
        window = self.hparams.window_fn(self.hparams.n_fft, device=wavs.device).pow(0.5)
        spec = torch.stft(wavs, self.hparams.n_fft, self.hparams.hop_length, self.hparams.n_fft,
                          window=window, return_complex=True)
        return torch.view_as_real(spec)

    def istft(self, spec, length):
        """Inverse of :meth:`stft`."""
        window = self.hparams.window_fn(self.hparams.n_fft, device=spec.device).pow(0.5)
        return torch.istft(torch.view_as_complex(spec.contiguous()), self.hparams.n_fft,
                           self.hparams.hop_length, self.hparams.n_fft, window=window, length=length)

    def compute_forward(self, batch, stage):
        """Noisy waveform -> (enhanced STFT, enhanced waveform).

        GTCRN is causal, so the zero padding after a shorter batch item only
        changes its last STFT frame (the analysis window reaches into the padding)."""
        batch = batch.to(self.device)
        noisy_wavs, _ = batch.noisy_sig
        predict_spec = self.modules.model(self.stft(noisy_wavs))
        return predict_spec, self.istft(predict_spec, noisy_wavs.shape[1])

    def compute_objectives(self, predictions, batch, stage):
        """MSE between power-law compressed magnitudes (0.3, as GTCRN's loss); PESQ / STOI at test."""
        predict_spec, predict_wav = predictions
        clean_wavs, lens = batch.clean_sig
        clean_spec = self.stft(clean_wavs)
        loss = self.hparams.compute_cost(self.compressed(predict_spec), self.compressed(clean_spec), lens)
        self.track_metrics(batch, predict_wav, clean_wavs, lens, stage)
        return loss

    @staticmethod
    def compressed(spec):
        """|X|^0.3 per bin, as (batch, frames, bins) for length masking."""
        mag = torch.sqrt(spec[..., 0] ** 2 + spec[..., 1] ** 2 + 1e-12)
        return mag.pow(0.3).transpose(1, 2)


def load_pretrained(model, path):
    """Load the authors' checkpoint (a dict whose ``model`` entry is the state dict), every key required."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GTCRN checkpoint {path} not found: pass --pretrained_path "
                                "(e.g. ../shared/models/gtcrn/model_trained_on_vctk.tar)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    model.load_state_dict(state, strict=True)


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

    # Pretrained weights first; a fine-tuned checkpoint in save_folder (if any) replaces them below.
    load_pretrained(hparams["model"], hparams["pretrained_path"])
    se_brain = GTCRNBrain(
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
