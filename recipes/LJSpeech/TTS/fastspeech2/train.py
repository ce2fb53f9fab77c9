#!/usr/bin/env python3
"""Recipe for training a small FastSpeech2 (internal alignment) on LJSpeech, then quantizing it.

The model learns its token durations with its own aligner (no external
forced alignment), as in SpeechBrain's ``train_internal_alignment.py``
recipe, with characters as input tokens. The metric is the teacher-forced
mel and PostNet mel MSE (durations from the aligner, pitch and energy from
the target audio), which is deterministic; its sum is what quantization
(``--quantize=esc``) minimises on the calibration clips.

To run this recipe (from the repository root; see README.md)::

    python recipes/LJSpeech/TTS/fastspeech2/train.py recipes/LJSpeech/TTS/fastspeech2/hparams/fastspeech2.yaml \
        --data_folder=../shared/data/ljspeech --pseudo_label_model=../shared/models/whisper-tiny.en \
        [--quantize=esc] [--quantization="{bits: 4}"]

Authors
 * esc_plugin contributors 2025
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.metric_stats import MetricStats

from esc_plugin.speechbrain import quantize_brain


def masked_mse_per_utterance(predicted, target, lengths):
    """Mean squared error of each utterance over its valid frames (as SpeechBrain's loss).

    Arguments
    ---------
    predicted : torch.Tensor
        ``(batch, frames, n_mels)``.
    target : torch.Tensor
        ``(batch, frames, n_mels)``.
    lengths : torch.Tensor
        Valid frames per utterance.

    Returns
    -------
    torch.Tensor
        ``(batch,)`` errors.

    Example
    -------
    >>> target = torch.zeros(2, 3, 2)
    >>> masked_mse_per_utterance(target + 1, target, torch.tensor([3, 1]))
    tensor([1., 1.])
    """
    frames = torch.arange(target.shape[1], device=target.device)
    mask = (frames[None, :] < lengths[:, None]).unsqueeze(-1).to(target.dtype)
    squared = (predicted - target) ** 2 * mask
    return squared.sum(dim=(1, 2)) / (lengths.to(target.dtype) * target.shape[2])


def mel_plus_postnet_mse(mel_out, postnet_out, target, lengths):
    """Per-utterance mel MSE + PostNet mel MSE: the recipe's metric and quantization objective."""
    return masked_mse_per_utterance(mel_out, target, lengths) + masked_mse_per_utterance(
        postnet_out, target, lengths
    )


class FastSpeech2Brain(sb.Brain):
    """FastSpeech2 with internal alignment, trained and evaluated teacher-forced."""

    def compute_forward(self, batch, stage):
        """Teacher-forced forward: durations from the aligner, pitch and energy from the target."""
        inputs, _ = self.batch_to_device(batch)
        return self.modules.model(*inputs)

    def compute_objectives(self, predictions, batch, stage):
        """SpeechBrain's ``LossWithAlignment`` (train, valid); outside training also the mel errors.

        The test loss is the mean mel + PostNet MSE alone: the duration, pitch,
        energy, SSIM and alignment terms only matter for training, and the
        quantization stage evaluates the test stage many times.
        """
        _, targets, (_, wavs) = self.batch_to_device(batch, return_metadata=True)
        if stage != sb.Stage.TRAIN:
            mel_target, mel_lengths = targets[0], targets[3]
            mel_out, postnet_out = predictions[0], predictions[1]
            self.mel_metric.append(
                [Path(w).stem for w in wavs],
                mel_out=mel_out, postnet_out=postnet_out, target=mel_target, lengths=mel_lengths,
            )
            mel = masked_mse_per_utterance(mel_out, mel_target, mel_lengths)
            postnet = masked_mse_per_utterance(postnet_out, mel_target, mel_lengths)
            self.mel_scores.extend(mel.tolist())
            self.postnet_scores.extend(postnet.tolist())
            if stage == sb.Stage.TEST:
                return (mel + postnet).mean()
        loss = self.hparams.criterion(predictions, targets, self.hparams.epoch_counter.current)
        return loss["total_loss"]

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Noam learning-rate schedule, per optimizer step."""
        if should_step:
            self.hparams.noam_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        """Fresh metric trackers for validation and test."""
        if stage != sb.Stage.TRAIN:
            self.mel_metric = MetricStats(metric=mel_plus_postnet_mse)
            self.mel_scores, self.postnet_scores = [], []

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log, checkpoint on the validation mel error, keep the test summary in ``test_stats``."""
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            return
        stats = {
            "mel_loss": float(np.mean(self.mel_scores)),
            "postnet_mel_loss": float(np.mean(self.postnet_scores)),
            "total_mel_loss": self.mel_metric.summarize("average"),
        }
        if stage == sb.Stage.VALID:
            stats["loss"] = stage_loss
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": self.hparams.noam_annealing.current_lr},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(meta=stats, min_keys=["total_mel_loss"])
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                test_stats=stats,
            )
            self.test_stats = stats

    def batch_to_device(self, batch, return_metadata=False):
        """Unpack a ``TextMelCollateWithAlignment`` batch: model inputs, loss targets, metadata."""
        (tokens, input_lengths, mels, pitch, energy, mel_lengths, labels, wavs) = batch
        tokens = tokens.to(self.device).long()
        input_lengths = input_lengths.to(self.device).long()
        mels = mels.to(self.device).float()
        pitch = pitch.to(self.device).float()
        energy = energy.to(self.device).float()
        mel_lengths = mel_lengths.to(self.device).long()
        x = (tokens, mels, pitch, energy)
        y = (mels, pitch, energy, mel_lengths, input_lengths)
        if return_metadata:
            return x, y, (labels, wavs)
        return x, y


def normalized_log_pitch(audio, n_frames, hparams):
    """Frame-level pitch (torchaudio's NCCF detector) as per-utterance z-scored log-F0.

    Normalising each utterance avoids dataset statistics that the small
    stand-in set could not estimate; the model only sees relative pitch.
    """
    pitch = AF.detect_pitch_frequency(
        audio.unsqueeze(0),
        hparams["sample_rate"],
        frame_time=hparams["hop_length"] / hparams["sample_rate"],
        win_length=3,
        freq_low=hparams["min_f0"],
        freq_high=hparams["max_f0"],
    ).squeeze(0)
    log_f0 = torch.log(pitch.clamp(min=1.0))
    log_f0 = (log_f0 - log_f0.mean()) / (log_f0.std() + 1e-5)
    if len(log_f0) < n_frames:  # the detector yields one frame less than the STFT
        log_f0 = torch.cat([log_f0, log_f0[-1:].expand(n_frames - len(log_f0))])
    return log_f0[:n_frames]


def dataio_prepare(hparams):
    """Datasets for train / calib (valid) / test with on-the-fly characters, mels, pitch, energy."""
    symbols = list(hparams["symbols"])
    if len(set(symbols)) != len(symbols):
        raise ValueError("hparams `symbols` has repeated characters: list each character once.")
    if hparams["n_symbols"] != len(symbols) + 2:
        raise ValueError(
            f"n_symbols is {hparams['n_symbols']} but symbols has {len(symbols)} characters: "
            f"set n_symbols: {len(symbols) + 2} (characters + padding + unk)."
        )
    encoder = hparams["input_encoder"]
    # Index 0 is a dummy symbol, so that padding (0) never collides with a character.
    encoder.update_from_iterable(["@@"] + symbols, sequence_input=False)
    encoder.add_unk()

    @sb.utils.data_pipeline.takes("wav", "label")
    @sb.utils.data_pipeline.provides("mel_text_pair")
    def audio_pipeline(wav, label):
        tokens = encoder.encode_sequence_torch(list(label.lower())).int()
        audio = sb.dataio.dataio.read_audio(wav)
        mel, energy = hparams["mel_spectogram"](audio=audio)
        pitch = normalized_log_pitch(audio, mel.shape[-1], hparams)
        return tokens, mel, pitch, energy, len(tokens), mel.shape[-1]

    datasets = {}
    for name, key in (("train", "train_json"), ("valid", "valid_json"), ("test", "test_json")):
        datasets[name] = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=hparams[key],
            replacements={"data_root": hparams["data_folder"]},
            dynamic_items=[audio_pipeline],
            output_keys=["mel_text_pair", "wav", "label"],
        )
    return datasets


if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    with open(hparams_file) as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )

    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from ljspeech_prepare import prepare_ljspeech  # noqa: E402

    run_on_main(
        prepare_ljspeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["manifest_folder"],
            "n_calib": hparams["n_calib"],
            "n_test": hparams["n_test"],
            "pseudo_label_model": hparams["pseudo_label_model"],
            "sample_rate": hparams["sample_rate"],
            "skip_prep": hparams["skip_prep"],
        },
    )
    datasets = dataio_prepare(hparams)

    brain = FastSpeech2Brain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    brain.evaluate(
        datasets["test"],
        min_key="total_mel_loss",
        test_loader_kwargs=hparams["test_dataloader_opts"],
    )
    quantize_brain(brain, hparams, calib_set=datasets["valid"], test_set=datasets["test"],
                   loader_kwargs=hparams["test_dataloader_opts"])
