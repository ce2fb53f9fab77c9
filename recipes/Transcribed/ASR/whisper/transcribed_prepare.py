"""Manifests for the Whisper recipe: the 18 transcribed clips of the shared
data folder, and the calibration utterances.

``data_folder`` holds (the layout of ``../shared/data``)::

    sb_samples/ASR_train.json, ASR_dev.json, ASR/*.wav   10 transcribed clips, 2 speakers, 16 kHz
    ljspeech/metadata.csv, wavs/LJ001-0001..0008.wav     8 transcribed clips, 1 speaker, 22.05 kHz
    librispeech_speakers/<speaker>/*.flac                LibriSpeech test-other, 10 speakers x 10,
                                                         used untranscribed

Two calibration sources (``calib_source``):

* ``librispeech`` (default): calib.json = the first ``n_calib`` LibriSpeech
  utterances in speaker round-robin order (each speaker's sorted ids
  shuffled with ``seed``), with empty ``words``: the recipe labels them with
  the FP32 model's own greedy transcripts. test.json = all 18 transcribed
  clips. Calibration and test share neither clips nor speakers.
* ``transcribed``: the 18 clips are split as in ``esc_plugin.tasks.whisper``
  (round-robin over the 3 speakers): the first ``n_calib`` (at most 17;
  use 9) are calib.json with their true transcripts, the rest test.json
  (clip-disjoint, not speaker-disjoint: only 3 speakers exist).

Each entry: ``{"wav": "{data_root}/...", "words": ..., "spk_id": ..., "duration": ...}``.

Authors
 * esc_plugin contributors
"""
import csv
import json
import os

import soundfile as sf

from esc_plugin.core.errors import ConfigError
from esc_plugin.core.io import write_json
from esc_plugin.tasks.whisper import LJ_IDS, LIBRISPEECH_DIR, speaker_round_robin, split_clips

CALIB_SOURCES = ("librispeech", "transcribed")
OPTIONS_FILE = "prepare_options.json"


def prepare_transcribed(data_folder, save_folder, calib_source="librispeech", n_calib=100, seed=0,
                        skip_prep=False):
    """Write ``calib.json`` and ``test.json`` into ``save_folder``.

    Arguments
    ---------
    data_folder : str
        The shared ``data`` folder (see the module docstring).
    save_folder : str
        Where the manifests go.
    calib_source : str
        ``"librispeech"`` or ``"transcribed"`` (see the module docstring).
    n_calib : int
        Calibration items.
    seed : int
        Seed of the order in which items are taken.
    skip_prep : bool
        Do nothing (manifests already there).
    """
    if skip_prep:
        return
    if calib_source not in CALIB_SOURCES:
        raise ConfigError(f"calib_source must be one of {CALIB_SOURCES}, got {calib_source!r}")
    options = {"data_folder": os.path.abspath(data_folder), "calib_source": calib_source,
               "n_calib": n_calib, "seed": seed}
    opt_path = os.path.join(save_folder, OPTIONS_FILE)
    if os.path.isfile(opt_path) and all(os.path.isfile(os.path.join(save_folder, f))
                                        for f in ("calib.json", "test.json")):
        with open(opt_path) as f:
            if json.load(f) == options:
                return  # same data and split: keep the manifests (and the labels made from them)
    transcribed = _transcribed_entries(data_folder)
    if calib_source == "librispeech":
        calib = _librispeech_entries(data_folder, n_calib, seed)
        test = transcribed
    else:
        items = [dict(id=k, speaker=v["spk_id"]) for k, v in transcribed.items()]
        calib_items, test_items = split_clips(items, n_calib, seed)
        calib = {c["id"]: transcribed[c["id"]] for c in calib_items}
        test = {c["id"]: transcribed[c["id"]] for c in test_items}
    os.makedirs(save_folder, exist_ok=True)
    write_json(os.path.join(save_folder, "calib.json"), calib)
    write_json(os.path.join(save_folder, "test.json"), test)
    write_json(opt_path, options)


def _entry(data_folder, rel_path, words, spk_id):
    info = sf.info(os.path.join(data_folder, rel_path))
    return {"wav": "{data_root}/" + rel_path, "words": words, "spk_id": spk_id,
            "duration": round(info.frames / info.samplerate, 3)}


def _require(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found at {path}: pass --data_folder=<shared>/data "
                                "(the folder holding sb_samples/, ljspeech/ and librispeech_speakers/)")
    return path


def _transcribed_entries(data_folder):
    """The 10 SpeechBrain sample clips with transcripts, then LJ001-0001..0008."""
    entries = {}
    for name in ("ASR_train.json", "ASR_dev.json"):
        with open(_require(os.path.join(data_folder, "sb_samples", name), name)) as f:
            meta = json.load(f)
        for uid, ex in meta.items():
            rel = ex["wav"].replace("{data_root}", "sb_samples/ASR").lstrip("/")
            entries[uid] = _entry(data_folder, rel, ex["words"], ex.get("spk_id", uid.split("_")[0]))
    metadata = _require(os.path.join(data_folder, "ljspeech", "metadata.csv"), "LJSpeech metadata.csv")
    with open(metadata, newline="", encoding="utf-8") as f:
        rows = {r[0]: r for r in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE)}
    for uid in LJ_IDS:
        if uid not in rows:
            raise FileNotFoundError(f"{uid} missing from {metadata}")
        entries[uid] = _entry(data_folder, f"ljspeech/wavs/{uid}.wav", rows[uid][2], "LJ")
    return entries


def _librispeech_entries(data_folder, n_calib, seed):
    folder = _require(os.path.join(data_folder, LIBRISPEECH_DIR), "LibriSpeech speaker folder")
    utts = [dict(id=os.path.splitext(f)[0], speaker=spk)
            for spk in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, spk))
            for f in sorted(os.listdir(os.path.join(folder, spk))) if f.endswith(".flac")]
    order = speaker_round_robin(utts, seed)
    if not 0 < n_calib <= len(order):
        raise ConfigError(f"n_calib={n_calib} but {folder} holds {len(order)} utterances")
    return {u["id"]: _entry(data_folder, f"{LIBRISPEECH_DIR}/{u['speaker']}/{u['id']}.flac", "", u["speaker"])
            for u in order[:n_calib]}
