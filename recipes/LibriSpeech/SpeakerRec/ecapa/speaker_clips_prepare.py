"""Speaker-classification manifests from Speech Commands (training data of the
ECAPA-TDNN speaker embedding).

Speech Commands has many speakers with a few 1-s words each; the speaker is the
hex id right before ``_nohash_`` (``<label>/<speaker>_nohash_<n>.wav`` in the
distributed dataset, ``.flac`` in ``shared/data/speech_commands``; the word
prefix of ``_unknown_/<word>_<speaker>_nohash_<n>`` clips is not part of it:
:func:`esc_plugin.datasets.speech_commands.speaker_of`). Clips without a
speaker (``_background_noise_``, ``_silence_``, any name without
``_nohash_``) are skipped.

Speakers with at least ``min_clips_per_speaker`` clips are kept (the classes of
the AAM-softmax loss). Of each speaker's clips (sorted by path), every
``valid_every``-th one, starting with the last, goes to ``valid.json`` and the
rest to ``train.json``: the validation set measures speaker *classification*
on unseen clips of the training speakers, used to pick the best checkpoint.
Verification is tested on LibriSpeech speakers (``../librispeech_prepare.py``),
disjoint from these.

Example
-------
>>> prepare_speech_commands_speakers("../shared/data/speech_commands", "results/sc")  # doctest: +SKIP
"""
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import soundfile as sf

from esc_plugin.core.io import write_json
from esc_plugin.datasets.speech_commands import has_speaker_id, speaker_of

logger = logging.getLogger(__name__)

TRAIN_JSON = "train.json"
VALID_JSON = "valid.json"
OPTIONS_JSON = "speakers_options.json"
NO_SPEAKER_FOLDERS = ("_background_noise_", "_silence_")


def prepare_speech_commands_speakers(
    data_folder,
    save_folder,
    min_clips_per_speaker=5,
    valid_every=8,
    max_speakers=None,
    max_clips_per_speaker=None,
    skip_prep=False,
):
    """Write ``train.json`` and ``valid.json`` (items: ``wav``, ``spk_id``, ``duration``).

    Arguments
    ---------
    data_folder : str
        Speech Commands root (one folder per label).
    save_folder : str
        Where the manifests go; existing manifests written with the same
        options are kept.
    min_clips_per_speaker : int
        Speakers with fewer clips are left out.
    valid_every : int
        One clip in ``valid_every`` of each speaker is a validation clip.
    max_speakers : int or None
        Keep only the speakers with the most clips (ties by id); for quick tests.
    max_clips_per_speaker : int or None
        Keep only the first clips of each speaker; for quick tests.
    skip_prep : bool
        Do nothing (the manifests are assumed to exist).

    Returns
    -------
    dict
        Counts (speakers, train clips, valid clips).
    """
    if skip_prep:
        return None
    if valid_every < 2:
        raise ValueError(f"valid_every must be >= 2 (one validation clip in valid_every), got {valid_every}")
    if min_clips_per_speaker < 2:
        raise ValueError(
            f"min_clips_per_speaker must be >= 2 (each speaker needs a train and a validation clip), "
            f"got {min_clips_per_speaker}"
        )
    options = dict(
        data_folder=os.path.abspath(data_folder),
        min_clips_per_speaker=min_clips_per_speaker,
        valid_every=valid_every,
        max_speakers=max_speakers,
        max_clips_per_speaker=max_clips_per_speaker,
        # Manifests prepared before the speaker id dropped the word prefix of
        # _unknown_ clips (esc_plugin.datasets.speech_commands) are not reused.
        speaker_id="hex id before _nohash_",
    )
    save_folder = Path(save_folder)
    train_json, valid_json, options_json = (save_folder / n for n in (TRAIN_JSON, VALID_JSON, OPTIONS_JSON))
    if train_json.exists() and valid_json.exists() and options_json.exists():
        previous = json.loads(options_json.read_text())
        if previous.get("options") == options:
            logger.info("Speech Commands speaker manifests already prepared in %s", save_folder)
            return previous["counts"]

    clips = _clips_by_speaker(Path(data_folder))
    speakers = [s for s, c in clips.items() if len(c) >= min_clips_per_speaker]
    speakers.sort(key=lambda s: (-len(clips[s]), s))
    if max_speakers is not None:
        speakers = speakers[:max_speakers]
    if len(speakers) < 2:
        raise ValueError(
            f"Only {len(speakers)} speakers with >= {min_clips_per_speaker} clips under '{data_folder}': "
            "lower min_clips_per_speaker or point train_folder at Speech Commands."
        )
    data_root = Path(data_folder)
    train, valid = OrderedDict(), OrderedDict()
    for spk in sorted(speakers):
        spk_clips = clips[spk][:max_clips_per_speaker]
        for i, path in enumerate(reversed(spk_clips)):
            entry = {
                "wav": "{data_root}/" + path.relative_to(data_root).as_posix(),
                "spk_id": spk,
                "duration": round(sf.info(str(path)).duration, 3),
            }
            target = valid if i % valid_every == 0 else train
            target[f"{path.parent.name}/{path.stem}"] = entry
    write_json(train_json, train)
    write_json(valid_json, valid)
    counts = {"speakers": len(speakers), "train_clips": len(train), "valid_clips": len(valid)}
    write_json(options_json, {"options": options, "counts": counts})
    logger.info("Speech Commands speaker manifests written to %s: %s", save_folder, counts)
    return counts


def _clips_by_speaker(data_folder):
    if not data_folder.is_dir():
        raise FileNotFoundError(
            f"Speech Commands folder '{data_folder}' not found: set the recipe's train_folder "
            "(e.g. --data_folder=../shared/data, or --train_folder=/path/to/speech_commands_v0.02)."
        )
    clips = {}
    for path in sorted(data_folder.glob("*/*")):
        if path.suffix not in (".wav", ".flac") or path.parent.name in NO_SPEAKER_FOLDERS:
            continue
        if has_speaker_id(path):
            clips.setdefault(speaker_of(path), []).append(path)
    return clips
