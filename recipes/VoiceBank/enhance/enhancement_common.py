"""Shared by the VoiceBank enhancement recipes: data pipeline (on-the-fly mixing), metrics, Brain base.

* :func:`dataio_prep` builds the ``train`` / ``calib`` / ``test`` datasets from
  the manifests of ``voicebank_prepare.py``; training mixtures get a new noise
  segment, SNR and level every time an item is loaded.
* :class:`EnhancementBrain` holds the metric side of a recipe's Brain:
  wideband PESQ and STOI at test, per data source (VoiceBank pairs vs.
  synthetic mixtures), ``self.test_stats``, and the best-checkpoint policy
  (validation loss). A recipe adds ``compute_forward`` and
  ``compute_objectives`` (which calls :meth:`EnhancementBrain.track_metrics`).
* :func:`noisy_baseline`: PESQ/STOI of the unprocessed input.

Authors
 * esc_plugin contributors 2025
"""
import json
import logging
import math
import os
import random

import torch
import torchaudio

import speechbrain as sb
from speechbrain.dataio.dataio import read_audio
from speechbrain.utils.metric_stats import MetricStats

from esc_plugin.core.io import write_json
from esc_plugin.metrics.enhancement import pesq_score, stoi_score

logger = logging.getLogger(__name__)
SAMPLE_RATE = 16000  # PESQ wideband and the models' STFTs assume 16 kHz


# ------------------------------------------------------------------ metrics

def pesq_wb(predict, target):
    """Wideband PESQ of one enhanced waveform against its clean reference.

    A waveform PESQ cannot score (silent or non-finite output, e.g. from a
    broken quantized model) gets NaN, which the quantization stage treats as
    the worst objective value instead of stopping the search.
    """
    try:
        return pesq_score(target, predict, SAMPLE_RATE)
    except ValueError as err:
        logger.warning("PESQ undefined (%s): scored as NaN", err)
        return float("nan")


def stoi(predict, target):
    """STOI of one enhanced waveform against its clean reference (NaN when undefined)."""
    try:
        return stoi_score(target, predict, SAMPLE_RATE)
    except ValueError as err:
        logger.warning("STOI undefined (%s): scored as NaN", err)
        return float("nan")


def source_of(item_id):
    """``voicebank`` for the recorded VoiceBank+DEMAND pairs, ``synthetic`` for made mixtures."""
    return "voicebank" if item_id.startswith("voicebank_") else "synthetic"


def per_source_means(metric, name):
    """Mean score per data source, e.g. ``{"pesq_voicebank": .., "pesq_synthetic": ..}``."""
    groups = {}
    for item_id, score in zip(metric.ids, metric.scores):
        groups.setdefault(source_of(item_id), []).append(float(score))
    return {f"{name}_{src}": sum(v) / len(v) for src, v in sorted(groups.items())}


class EnhancementBrain(sb.Brain):
    """Metric bookkeeping for enhancement recipes.

    The Brain has two MetricStats at test time, ``pesq_metric`` and
    ``stoi_metric``; the quantization stage must be told which one to
    optimise (``quantization: {metric: pesq_metric, higher_is_better: true}``).
    PESQ is scored in ``compute_objectives`` (the stage's objective runs it
    about 100 times); STOI only in ``on_stage_end``, which the stage's
    objective never calls, so calibration pays for PESQ alone.
    """

    def track_metrics(self, batch, predict_wav, clean_wavs, lens, stage):
        """Call from ``compute_objectives``: PESQ now, STOI inputs kept for ``on_stage_end`` (test only)."""
        if stage != sb.Stage.TEST:
            return  # validation selects checkpoints on the loss alone (PESQ is slow)
        predict_wav = predict_wav.detach()
        self.pesq_metric.append(batch.id, predict=predict_wav, target=clean_wavs, lengths=lens)
        self.stoi_inputs.append((batch.id, predict_wav.cpu(), clean_wavs.detach().cpu(), lens.cpu()))

    def on_stage_start(self, stage, epoch=None):
        """Fresh metric trackers for the test (and for each quantization objective evaluation)."""
        if stage == sb.Stage.TEST:
            self.pesq_metric = MetricStats(metric=pesq_wb, n_jobs=1, batch_eval=False)
            self.stoi_metric = MetricStats(metric=stoi, n_jobs=1, batch_eval=False)
            self.stoi_inputs = []

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log; keep the best checkpoint by validation loss; store test stats in ``self.test_stats``."""
        if stage == sb.Stage.TRAIN:
            self.train_loss = stage_loss
            return
        if stage == sb.Stage.VALID:
            stats = {"loss": stage_loss}
            epoch_stats = {"Epoch": epoch}
            annealing = getattr(self.hparams, "lr_annealing", None)
            if annealing is not None:  # e.g. NewBob: halve the learning rate when the loss stalls
                old_lr, new_lr = annealing(stage_loss)
                sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
                epoch_stats["lr"] = old_lr
            self.hparams.train_logger.log_stats(
                epoch_stats, train_stats={"loss": self.train_loss}, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta=stats, min_keys=["loss"])
            return
        for ids, predict, target, lens in self.stoi_inputs:
            self.stoi_metric.append(ids, predict=predict, target=target, lengths=lens)
        self.stoi_inputs = []
        stats = {"loss": stage_loss, "pesq": self.pesq_metric.summarize("average"),
                 "stoi": self.stoi_metric.summarize("average")}
        stats.update(per_source_means(self.pesq_metric, "pesq"))
        stats.update(per_source_means(self.stoi_metric, "stoi"))
        self.hparams.train_logger.log_stats(
            {"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats)
        self.test_stats = {k: float(v) for k, v in stats.items()}


# ------------------------------------------------------------------ data

def load_segment(segment):
    """Read ``{"file", "start", "stop", "sample_rate"}`` (``stop`` None: to the end) as 16 kHz mono float."""
    if segment.get("stop") is None:
        wav = read_audio(segment["file"])
    else:
        wav = read_audio({"file": segment["file"], "start": segment["start"], "stop": segment["stop"]})
    if wav.dim() > 1:
        wav = wav.mean(dim=-1)
    rate = segment["sample_rate"]
    if rate != SAMPLE_RATE:
        wav = torchaudio.functional.resample(wav, rate, SAMPLE_RATE)
    return wav


def to_16k_index(index, rate):
    """A sample index at ``rate`` Hz, at 16 kHz."""
    return int(round(index * SAMPLE_RATE / rate))


def loop_noise(noise_part, offset, length):
    """``length`` samples of ``noise_part`` starting at ``offset``, wrapping around.

    Example
    -------
    >>> loop_noise(torch.arange(4.0), 3, 6).tolist()
    [3.0, 0.0, 1.0, 2.0, 3.0, 0.0]
    """
    reps = math.ceil((offset + length) / noise_part.numel())
    return noise_part.repeat(reps)[offset:offset + length]


def mix(clean, noise, snr_db, level_db):
    """Scale ``noise`` to ``snr_db`` below ``clean``, then both to an RMS of ``level_db`` dBFS
    (lowered if needed so that the mixture does not clip). Returns (noisy, clean)."""
    eps = 1e-10
    clean_power = clean.pow(2).mean() + eps
    noise_power = noise.pow(2).mean() + eps
    noise = noise * torch.sqrt(clean_power / (noise_power * 10 ** (snr_db / 10)))
    noisy = clean + noise
    gain = 10 ** (level_db / 20) / torch.sqrt(noisy.pow(2).mean() + eps)
    peak = (noisy * gain).abs().max()
    if peak > 0.99:
        gain = gain * 0.99 / peak
    return noisy * gain, clean * gain


def dataio_prep(hparams):
    """Datasets ``train``, ``calib`` and ``test`` from ``hparams["manifest_folder"]``.

    Training items are mixed anew on every load (noise segment from the
    training part of the noise recordings, SNR in ``train_snr_range``, level
    in ``train_level_range``); calibration and synthetic test items are mixed
    as their manifest entry says; VoiceBank items are read as recorded.
    """
    folder = hparams["manifest_folder"]
    with open(os.path.join(folder, "noise_train.json")) as f:
        train_noises = list(json.load(f).values())
    noise_cache = {}  # whole noise recordings at 16 kHz (a few MB)
    rng = random.Random(hparams["seed"])
    snr_low, snr_high = hparams["train_snr_range"]
    level_low, level_high = hparams["train_level_range"]

    def noise_recording(noise):
        if noise["file"] not in noise_cache:
            noise_cache[noise["file"]] = load_segment(dict(noise, stop=None))
        return noise_cache[noise["file"]]

    @sb.utils.data_pipeline.takes("clean", "noise", "noisy", "snr_db", "level_db")
    @sb.utils.data_pipeline.provides("noisy_sig", "clean_sig")
    def mixture_pipeline(clean, noise, noisy, snr_db, level_db):
        clean_sig = load_segment(clean)
        if noisy is not None:  # recorded pair (VoiceBank+DEMAND)
            noisy_sig = load_segment(noisy)
            length = min(noisy_sig.numel(), clean_sig.numel())
            yield noisy_sig[:length]
            yield clean_sig[:length]
            return
        if noise is None:  # training window: a new noise, SNR and level every time
            noise = rng.choice(train_noises)
            noise = dict(noise, offset=rng.randrange(noise["start"], noise["stop"]))
            snr_db = rng.uniform(snr_low, snr_high)
            level_db = rng.uniform(level_low, level_high)
        rate = noise["sample_rate"]
        lo, hi = to_16k_index(noise["start"], rate), to_16k_index(noise["stop"], rate)
        part = noise_recording(noise)[lo:hi]
        noise_sig = loop_noise(part, to_16k_index(noise["offset"], rate) - lo, clean_sig.numel())
        noisy_sig, clean_sig = mix(clean_sig, noise_sig, snr_db, level_db)
        yield noisy_sig
        yield clean_sig

    datasets = {}
    for name in ("train", "calib", "test"):
        datasets[name] = sb.dataio.dataset.DynamicItemDataset.from_json(
            json_path=os.path.join(folder, f"{name}.json"),
            dynamic_items=[mixture_pipeline],
            output_keys=["id", "noisy_sig", "clean_sig"],
        )
    if hparams.get("train_select_n"):  # a quick run on the first windows only (tests)
        datasets["train"] = datasets["train"].filtered_sorted(select_n=hparams["train_select_n"])
    # Similar lengths in a test batch: less padding.
    datasets["test"] = datasets["test"].filtered_sorted(sort_key="duration")
    return datasets


def prepare_kwargs(hparams):
    """The ``prepare_voicebank`` arguments taken from a recipe's hparams."""
    keys = ("voicebank_folder", "speaker_folder", "noise_folder", "ljspeech_folder", "speech_commands_folder",
            "max_speech_commands", "n_calib",
            "n_calib_speakers", "n_test_speakers", "max_test_synthetic", "train_seconds", "calib_seconds",
            "test_seconds", "snr_range", "level_db", "seed", "skip_prep")
    return dict({k: hparams[k] for k in keys}, save_folder=hparams["manifest_folder"])


def noisy_baseline(datasets, path):
    """PESQ/STOI of the unprocessed noisy input per dataset (what enhancement must beat), cached in ``path``."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = {}
    for name, data in datasets.items():
        pesq_stats = MetricStats(metric=pesq_wb, batch_eval=False)
        stoi_stats = MetricStats(metric=stoi, batch_eval=False)
        for item in data:
            args = dict(predict=item["noisy_sig"][None], target=item["clean_sig"][None], lengths=torch.ones(1))
            pesq_stats.append([item["id"]], **args)
            stoi_stats.append([item["id"]], **args)
        result[name] = {"pesq": pesq_stats.summarize("average"), "stoi": stoi_stats.summarize("average"),
                        "items": len(pesq_stats.ids)}
        result[name].update(per_source_means(pesq_stats, "pesq"))
        result[name].update(per_source_means(stoi_stats, "stoi"))
    write_json(path, result)  # atomic: an interrupted run leaves no half file
    return result
