"""Data preparation for the VoiceBank enhancement recipes: SpeechBrain JSON manifests.

Three disjoint splits are written to ``save_folder``:

* ``train.json``: clean speech windows (LibriSpeech-style speaker folders,
  LJSpeech clips and, optionally, Speech Commands words for more speakers).
  The noise, the SNR and the level are drawn again at every epoch by the
  recipe's data pipeline, from the *training* part of each noise recording
  (listed in ``noise_train.json``).
* ``calib.json``: ``n_calib`` fixed mixtures of held-out speakers with the
  *calibration* part of each noise recording, at fixed SNRs; used as the
  validation set during training and as the calibration set of the
  quantization stage.
* ``test.json``: the VoiceBank+DEMAND noisy/clean pairs (recorded mixtures,
  DEMAND noise, unseen speakers) plus fixed mixtures of other held-out
  speakers with the *test* part of each noise recording.

Mixtures are not written to disk: an entry stores the clean segment, the noise
segment, the SNR and the level, and the recipe mixes them when it loads the
item, so the manifests alone define the data.

Each noise recording is cut in time into a training, a calibration and a test
part (``noise_split`` fractions), so no noise sample is shared between splits.
Speakers are split by sorted speaker id: the last ``n_test_speakers`` go to
test, the ``n_calib_speakers`` before them to calibration, the rest to training.

Authors
 * esc_plugin contributors 2025
"""
import glob
import json
import logging
import os
import random

import soundfile as sf

from esc_plugin.core.io import write_json
from esc_plugin.datasets.speech_commands import speaker_of

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac")
OPTIONS_FILE = "prepare_options.json"


class PreparationError(ValueError):
    """The data folders do not hold what the recipe needs; the message names the fix."""


def prepare_voicebank(
    save_folder,
    voicebank_folder,
    speaker_folder,
    noise_folder,
    ljspeech_folder=None,
    speech_commands_folder=None,
    max_speech_commands=None,
    n_calib=100,
    n_calib_speakers=3,
    n_test_speakers=2,
    max_test_synthetic=None,
    train_seconds=3.0,
    calib_seconds=2.0,
    test_seconds=4.0,
    noise_split=(0.6, 0.2, 0.2),
    snr_range=(0.0, 15.0),
    level_db=-25.0,
    seed=1234,
    skip_prep=False,
):
    """Write ``train.json``, ``noise_train.json``, ``calib.json``, ``test.json`` and ``splits.json``.

    Arguments
    ---------
    save_folder : str
        Where the manifests go.
    voicebank_folder : str
        VoiceBank+DEMAND test pairs: either flat ``<id>_noisy.wav`` /
        ``<id>_clean.wav`` files, or the official ``noisy_testset_wav[_16k]`` /
        ``clean_testset_wav[_16k]`` folders. Unpaired files are skipped.
    speaker_folder : str
        LibriSpeech-style ``<speaker>/**/*.flac|wav`` clean speech.
    noise_folder : str
        Noise recordings (``*.wav``), each cut into train/calibration/test parts.
    ljspeech_folder : str, optional
        LJSpeech ``wavs`` folder (one speaker), used for training only.
    speech_commands_folder : str, optional
        Speech Commands ``<label>/*.flac|wav`` folder; the clips of the word
        classes (not ``_silence_`` / ``_unknown_``) are used for training only.
    max_speech_commands : int, optional
        Cap on those clips, taken evenly over the sorted list.
    n_calib : int
        Number of calibration mixtures.
    n_calib_speakers, n_test_speakers : int
        Held-out speakers for calibration and for the synthetic test mixtures.
    max_test_synthetic : int, optional
        Cap on the synthetic test mixtures (one per held-out utterance otherwise).
    train_seconds, calib_seconds, test_seconds : float
        Length of the training windows, calibration mixtures, and maximum
        length of the synthetic test mixtures.
    noise_split : tuple of 3 floats
        Fractions of each noise recording for train / calibration / test.
    snr_range : tuple of 2 floats
        SNR range (dB) of the fixed calibration and test mixtures.
    level_db : float
        RMS level (dBFS) of the fixed mixtures.
    seed : int
        Seed of the draws (windows, noise offsets, SNRs).
    skip_prep : bool
        Do nothing.

    Returns
    -------
    dict
        The split summary written to ``splits.json`` (counts, speakers, noise parts),
        or ``None`` when skipped.

    Example
    -------
    >>> prepare_voicebank("out", "vb", "spk", "noise", skip_prep=True) is None
    True
    """
    if skip_prep:
        return None
    options = dict(locals())
    options.pop("skip_prep")
    options = {k: (list(v) if isinstance(v, tuple) else os.fspath(v) if isinstance(v, os.PathLike) else v)
               for k, v in options.items()}
    if _already_prepared(save_folder, options):
        logger.info("Manifests in %s are up to date, skipping preparation.", save_folder)
        with open(os.path.join(save_folder, "splits.json")) as f:
            return json.load(f)
    if len(noise_split) != 3 or abs(sum(noise_split) - 1.0) > 1e-6 or min(noise_split) <= 0:
        raise PreparationError(f"noise_split must be three positive fractions summing to 1, got {noise_split}")
    rng = random.Random(seed)

    speakers = _speaker_utterances(speaker_folder)
    needed = n_calib_speakers + n_test_speakers + 1
    if len(speakers) < needed:
        raise PreparationError(
            f"{speaker_folder} has {len(speakers)} speaker folders with audio, but "
            f"n_calib_speakers={n_calib_speakers} + n_test_speakers={n_test_speakers} + at least one "
            "training speaker are needed: point speaker_folder to more speakers or lower the counts.")
    ids = sorted(speakers)
    test_spk = ids[len(ids) - n_test_speakers:]
    calib_spk = ids[len(ids) - n_test_speakers - n_calib_speakers:len(ids) - n_test_speakers]
    train_spk = ids[:len(ids) - n_test_speakers - n_calib_speakers]

    noises = _noise_parts(noise_folder, noise_split)

    train = {}
    for spk in train_spk:
        for path in speakers[spk]:
            _add_windows(train, path, train_seconds)
    lj_clips = []
    if ljspeech_folder:
        lj_clips = _audio_files(ljspeech_folder)
        if not lj_clips:
            raise PreparationError(f"ljspeech_folder {ljspeech_folder} holds no .wav/.flac file; "
                                   "fix the path or set it to null.")
        for path in lj_clips:
            _add_windows(train, path, train_seconds)
    sc_clips = []
    if speech_commands_folder:
        sc_clips = _speech_commands_words(speech_commands_folder, max_speech_commands)
        for path in sc_clips:
            _add_windows(train, path, train_seconds)
    noise_train = {
        f"{name}_train": _segment(part["file"], part["train"][0], part["train"][1], part["sample_rate"])
        for name, part in noises.items()
    }

    calib_utts = [p for spk in calib_spk for p in speakers[spk]]
    calib = _fixed_mixtures(calib_utts, n_calib, calib_seconds, noises, "calib", snr_range, level_db, rng,
                            cycle=True)
    test_utts = [p for spk in test_spk for p in speakers[spk]]
    n_test_syn = len(test_utts) if max_test_synthetic is None else min(max_test_synthetic, len(test_utts))
    test = _voicebank_pairs(voicebank_folder)
    test.update(_fixed_mixtures(test_utts, n_test_syn, test_seconds, noises, "test", snr_range, level_db, rng,
                                cycle=False))

    splits = {
        "train": {"items": len(train), "speakers": train_spk + (["LJSpeech"] if lj_clips else []),
                  "librispeech_utterances": sum(len(speakers[s]) for s in train_spk),
                  "ljspeech_clips": len(lj_clips), "speech_commands_clips": len(sc_clips),
                  "speech_commands_speakers": len({speaker_of(p) for p in sc_clips}),
                  "seconds": round(sum(e["duration"] for e in train.values()), 1)},
        "calib": {"items": len(calib), "speakers": calib_spk, "utterances": len(calib_utts),
                  "seconds": round(sum(e["duration"] for e in calib.values()), 1)},
        "test": {"items": len(test),
                 "voicebank_pairs": sum(e["source"] == "voicebank" for e in test.values()),
                 "synthetic": sum(e["source"] == "synthetic" for e in test.values()),
                 "speakers": test_spk},
        "noise": {name: {"train": part["train"], "calib": part["calib"], "test": part["test"],
                         "sample_rate": part["sample_rate"]} for name, part in noises.items()},
    }
    os.makedirs(save_folder, exist_ok=True)
    for name, data in (("train.json", train), ("noise_train.json", noise_train), ("calib.json", calib),
                       ("test.json", test), ("splits.json", splits)):
        write_json(os.path.join(save_folder, name), data)  # atomic: never a half manifest
    write_json(os.path.join(save_folder, OPTIONS_FILE), options)  # last: marks the manifests complete
    logger.info("Prepared %d train windows, %d calibration and %d test items in %s",
                len(train), len(calib), len(test), save_folder)
    return splits


# ------------------------------------------------------------------ helpers

def _already_prepared(save_folder, options):
    path = os.path.join(save_folder, OPTIONS_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f) == json.loads(json.dumps(options))


def _audio_files(folder):
    files = []
    for ext in AUDIO_EXTENSIONS:
        files += glob.glob(os.path.join(folder, "**", "*" + ext), recursive=True)
    return sorted(files)


def _speech_commands_words(folder, cap):
    if not os.path.isdir(folder):
        raise PreparationError(f"speech_commands_folder {folder} does not exist: fix the path or set it to null.")
    clips = []
    for label in sorted(os.listdir(folder)):
        if not label.startswith("_") and os.path.isdir(os.path.join(folder, label)):
            clips += _audio_files(os.path.join(folder, label))
    if not clips:
        raise PreparationError(f"no word clip in {folder} (<label>/*.flac): fix the path or set it to null.")
    if cap is not None and len(clips) > cap:
        step = len(clips) / cap
        clips = [clips[int(k * step)] for k in range(cap)]
    return clips


def _speaker_utterances(folder):
    if not os.path.isdir(folder):
        raise PreparationError(f"speaker_folder {folder} does not exist: pass --speaker_folder "
                               "(LibriSpeech-style <speaker>/**/*.flac).")
    speakers = {}
    for name in sorted(os.listdir(folder)):
        files = _audio_files(os.path.join(folder, name)) if os.path.isdir(os.path.join(folder, name)) else []
        if files:  # folders without audio (e.g. an empty placeholder) are not speakers
            speakers[name] = files
    return speakers


def _segment(path, start, stop, sample_rate):
    # Absolute paths: the manifests stay valid whatever the working directory.
    return {"file": os.path.abspath(path), "start": int(start), "stop": int(stop), "sample_rate": int(sample_rate)}


def _add_windows(entries, path, seconds):
    """Cut one clean recording into consecutive windows of ``seconds`` (the last may be shorter
    but is dropped when under half a window, unless it is the only one)."""
    info = sf.info(path)
    rate, total = info.samplerate, info.frames
    win = int(round(seconds * rate))
    starts = list(range(0, max(total - win // 2, 1), win)) or [0]
    # The folder is part of the id: Speech Commands reuses file names across word folders.
    utt = os.path.basename(os.path.dirname(path)) + "_" + os.path.splitext(os.path.basename(path))[0]
    for k, start in enumerate(starts):
        stop = min(start + win, total)
        entries[f"{utt}_w{k}"] = {
            "clean": _segment(path, start, stop, rate), "noise": None, "noisy": None,
            "snr_db": None, "level_db": None, "duration": (stop - start) / rate, "source": "train",
        }


def _noise_parts(folder, split):
    files = sorted(glob.glob(os.path.join(folder, "*.wav")))
    if not files:
        raise PreparationError(f"noise_folder {folder} holds no .wav noise recording: pass --noise_folder.")
    parts = {}
    for path in files:
        info = sf.info(path)
        n = info.frames
        a = int(n * split[0])
        b = int(n * (split[0] + split[1]))
        parts[os.path.splitext(os.path.basename(path))[0]] = {
            "file": path, "sample_rate": info.samplerate, "train": [0, a], "calib": [a, b], "test": [b, n],
        }
    return parts


def _fixed_mixtures(utterances, count, seconds, noises, split, snr_range, level_db, rng, cycle):
    """``count`` mixtures of ``seconds`` (or shorter utterances) with the ``split`` part of the noises.

    With ``cycle`` the utterances are visited round-robin and each visit takes the
    next window of the utterance (wrapping around), so 100 items come from 30
    utterances with as little overlap as their lengths allow."""
    if count == 0:
        return {}
    if not utterances:
        raise PreparationError(f"no held-out utterance for the {split} mixtures: add speakers.")
    if not cycle and count > len(utterances):
        raise PreparationError(f"{count} {split} mixtures requested from {len(utterances)} utterances")
    names = sorted(noises)
    visits = {}
    entries = {}
    for k in range(count):
        path = utterances[k % len(utterances)]
        info = sf.info(path)
        rate, total = info.samplerate, info.frames
        win = min(int(round(seconds * rate)), total)
        n_windows = max(total // win, 1)
        visit = visits.get(path, 0)
        visits[path] = visit + 1
        start = (visit % n_windows) * win
        # Rotate the noise once per pass over the utterances, so that an utterance visited
        # again is mixed with another noise.
        noise_name = names[(k + k // len(utterances)) % len(names)]
        part = noises[noise_name]
        lo, hi = part[split]
        # The noise is read from a random offset inside this split's part (wrapping within it).
        offset = rng.randrange(lo, hi)
        utt = os.path.splitext(os.path.basename(path))[0]
        entries[f"{split}_{k:03d}_{utt}_{noise_name}"] = {
            "clean": _segment(path, start, start + win, rate),
            "noise": {"file": part["file"], "start": lo, "stop": hi, "offset": offset,
                      "sample_rate": part["sample_rate"]},
            "noisy": None,
            "snr_db": round(rng.uniform(*snr_range), 2),
            "level_db": level_db,
            "duration": win / rate,
            "source": "synthetic",
        }
    return entries


def _voicebank_pairs(folder):
    if not os.path.isdir(folder):
        raise PreparationError(f"voicebank_folder {folder} does not exist: pass --voicebank_folder "
                               "(VoiceBank+DEMAND test pairs).")
    pairs = {}
    for suffix in ("_16k", ""):  # the official layout; prefer the 16 kHz copies
        noisy_dir = os.path.join(folder, "noisy_testset_wav" + suffix)
        clean_dir = os.path.join(folder, "clean_testset_wav" + suffix)
        if os.path.isdir(noisy_dir) and os.path.isdir(clean_dir):
            for noisy in sorted(glob.glob(os.path.join(noisy_dir, "*.wav"))):
                clean = os.path.join(clean_dir, os.path.basename(noisy))
                if os.path.isfile(clean):
                    pairs[os.path.splitext(os.path.basename(noisy))[0]] = (clean, noisy)
            break
    else:  # flat <id>_clean.wav / <id>_noisy.wav files
        for noisy in sorted(glob.glob(os.path.join(folder, "*_noisy.wav"))):
            clean = noisy[: -len("_noisy.wav")] + "_clean.wav"
            if os.path.isfile(clean):
                pairs[os.path.basename(noisy)[: -len("_noisy.wav")]] = (clean, noisy)
    if not pairs:
        raise PreparationError(f"no noisy/clean pair found in {folder}: expected <id>_noisy.wav + "
                               "<id>_clean.wav, or noisy_testset_wav/ + clean_testset_wav/.")
    entries = {}
    for utt, (clean, noisy) in pairs.items():
        c, n = sf.info(clean), sf.info(noisy)
        if c.frames != n.frames or c.samplerate != n.samplerate:
            raise PreparationError(f"{clean} and {noisy} differ in length or sample rate")
        entries[f"voicebank_{utt}"] = {
            "clean": _segment(clean, 0, c.frames, c.samplerate),
            "noise": None,
            "noisy": _segment(noisy, 0, n.frames, n.samplerate),
            "snr_db": None, "level_db": None, "duration": c.frames / c.samplerate, "source": "voicebank",
        }
    return entries
