"""Speech Commands data preparation: speaker-disjoint train / calibration / test manifests.

Reads a folder with one sub-folder per label, each holding the clips of that
label (the layout of the Speech Commands v0.02 test set, and of
``../shared/data/speech_commands``)::

    <data_folder>/yes/022cd682_nohash_0.flac
    <data_folder>/_silence_/1024.flac
    ...

and writes SpeechBrain JSON manifests ``train.json``, ``calib.json`` and
``test.json`` into ``save_folder``. Each entry::

    "yes/022cd682_nohash_0": {
        "wav": "{data_root}/yes/022cd682_nohash_0.flac",
        "label": "yes",
        "words": "yes",
        "spk_id": "022cd682",
        "duration": 1.0
    }

``words`` is the spoken word: the label for the ten word classes; ``""`` for
``_silence_`` (no speech); for ``_unknown_`` the word in the file name
(``tree_7add4c5f_nohash_0`` -> ``tree``; ``null`` when the name has none).
The ASR recipe reads only the ten word classes (``labels=WORDS``): an empty
reference has no word error rate, and the few ``_unknown_`` clips (4 other
words, 47 clips here) are too few to learn their words from.

Split (:mod:`esc_plugin.datasets.speech_commands`, shared with the honk task
and the NeMo manifests): the speaker id is the hash right before ``_nohash_`` (``_unknown_``
clips carry a ``<word>_`` prefix before it, which is dropped); a clip without
``_nohash_`` (the ``_silence_`` clips) is its own speaker. Speakers are
shuffled with ``seed``; calibration speakers are taken in that order
(skipping any speaker whose clips would overshoot) until exactly ``n_calib``
clips are collected, then test speakers until at least ``test_fraction`` of
all clips are test clips; the remaining speakers are the training set. The
clips of each split are written in a seeded random order, so the first ``n``
entries of a manifest are a mix of classes.

Authors
 * esc_plugin contributors
"""
import json
import logging
import os
import random
from collections import Counter

import soundfile as sf

from esc_plugin.core.io import write_json
from esc_plugin.datasets.speech_commands import speaker_of
from esc_plugin.datasets.speech_commands import speaker_split as _speaker_split

logger = logging.getLogger(__name__)

#: The 12 classes of the Speech Commands KWS benchmark (honk's order).
LABELS = ["_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
#: The ten classes whose label is the spoken word.
WORDS = LABELS[2:]
AUDIO_EXTENSIONS = (".flac", ".wav")
SPLITS = ("train", "calib", "test")
OPTIONS_FILE = "prepare_options.json"


def prepare_speech_commands(
    data_folder,
    save_folder,
    labels=LABELS,
    n_calib=100,
    test_fraction=0.2,
    seed=0,
    skip_prep=False,
):
    """Write speaker-disjoint ``train.json`` / ``calib.json`` / ``test.json`` manifests.

    Arguments
    ---------
    data_folder : str
        Folder holding one sub-folder of clips per label.
    save_folder : str
        Where the manifests (and ``split.json``, the per-split counts) go.
    labels : list of str
        The label folders to read. The ASR recipe passes :data:`WORDS`.
    n_calib : int
        Exact number of calibration clips.
    test_fraction : float
        Minimum fraction of all clips assigned to the test set (whole speakers).
    seed : int
        Seed of the speaker shuffle and of the order of entries.
    skip_prep : bool
        If True, do nothing.

    Returns
    -------
    dict
        ``{split: number of clips}``.

    Example
    -------
    >>> import tempfile, numpy, soundfile
    >>> root = tempfile.mkdtemp()
    >>> for spk in range(6):
    ...     for word in ("yes", "no"):
    ...         os.makedirs(os.path.join(root, "data", word), exist_ok=True)
    ...         soundfile.write(os.path.join(root, "data", word, f"spk{spk}_nohash_0.wav"),
    ...                         numpy.zeros(1600), 16000)
    >>> prepare_speech_commands(os.path.join(root, "data"), os.path.join(root, "save"),
    ...                         labels=["yes", "no"], n_calib=4, test_fraction=0.3)
    {'train': 4, 'calib': 4, 'test': 4}
    """
    if skip_prep:
        return None
    options = {
        "data_folder": os.path.abspath(data_folder),
        "labels": list(labels),
        "n_calib": int(n_calib),
        "test_fraction": float(test_fraction),
        "seed": int(seed),
    }
    if _already_prepared(save_folder, options):
        logger.info("Speech Commands manifests in %s are up to date, skipping preparation", save_folder)
        with open(os.path.join(save_folder, "split.json")) as f:
            return {split: info["clips"] for split, info in json.load(f).items()}

    clips = list_clips(data_folder, labels)
    splits = speaker_split(clips, n_calib, test_fraction, seed)
    os.makedirs(save_folder, exist_ok=True)
    rng = random.Random(seed)
    summary = {}
    for split in SPLITS:
        entries = list(splits[split])
        rng.shuffle(entries)
        manifest = {clip_id(path, data_folder): make_entry(path, label, data_folder) for path, label in entries}
        write_json(os.path.join(save_folder, f"{split}.json"), manifest)
        summary[split] = {
            "clips": len(entries),
            "speakers": len({speaker_of(p) for p, _ in entries}),
            "per_label": dict(sorted(Counter(label for _, label in entries).items())),
        }
        logger.info("%s: %d clips, %d speakers", split, summary[split]["clips"], summary[split]["speakers"])
    write_json(os.path.join(save_folder, "split.json"), summary)
    # Written last: its presence means the manifests above are complete.
    write_json(os.path.join(save_folder, OPTIONS_FILE), options)
    return {split: info["clips"] for split, info in summary.items()}


def list_clips(data_folder, labels):
    """``[(path, label)]`` for every audio file in ``<data_folder>/<label>/``, sorted."""
    clips = []
    for label in labels:
        folder = os.path.join(data_folder, label)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"Speech Commands label folder '{folder}' not found: data_folder must hold one "
                f"sub-folder per label ({', '.join(labels)}); pass --data_folder=<path> "
                "(for this project: --data_folder=../shared/data/speech_commands)."
            )
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(AUDIO_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"no .flac/.wav clips in '{folder}'")
        clips += [(os.path.join(folder, n), label) for n in names]
    return clips


def spoken_word_of(path, label):
    """The transcript of a clip: the label for a word class, ``""`` for
    ``_silence_``, the file name's word prefix for ``_unknown_`` clips named
    ``<word>_<speaker>_nohash_<n>`` (``None`` when the name does not say).

    Example
    -------
    >>> spoken_word_of("data/_unknown_/tree_7add4c5f_nohash_0.wav.flac", "_unknown_")
    'tree'
    >>> spoken_word_of("data/_silence_/1024.flac", "_silence_"), spoken_word_of("x/yes/a_nohash_0.flac", "yes")
    ('', 'yes')
    """
    if label == "_silence_":
        return ""
    if label != "_unknown_":
        return label
    prefix = os.path.basename(path).split("_nohash_")[0]
    return prefix.rsplit("_", 1)[0] if "_nohash_" in os.path.basename(path) and "_" in prefix else None


def speaker_split(clips, n_calib, test_fraction, seed):
    """Split ``[(path, label)]`` by speaker into ``{"train", "calib", "test"}``.

    :func:`esc_plugin.datasets.speech_commands.speaker_split`, each split's
    clips grouped by speaker in the seeded speaker order. Raises a ValueError
    when exactly ``n_calib`` calibration clips cannot be collected from whole
    speakers, or when a split would be empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    split = _speaker_split(clips, n_calib, test_fraction, seed, group_by_speaker=True)
    splits = {name: split[name] for name in SPLITS}
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        raise ValueError(f"split(s) {empty} would be empty with {len(clips)} clips: lower n_calib / test_fraction")
    return splits


def clip_id(path, data_folder):
    """``<label>/<file name without audio extensions>``, unique within a data folder.

    Example
    -------
    >>> clip_id("/d/_unknown_/tree_7add4c5f_nohash_0.wav.flac", "/d")
    '_unknown_/tree_7add4c5f_nohash_0'
    """
    rel = os.path.relpath(path, data_folder).replace(os.sep, "/")
    while rel.lower().endswith(AUDIO_EXTENSIONS):
        rel = os.path.splitext(rel)[0]
    return rel


def make_entry(path, label, data_folder):
    """One manifest entry; ``wav`` uses the ``{data_root}`` placeholder."""
    info = sf.info(path)
    rel = os.path.relpath(path, data_folder).replace(os.sep, "/")
    return {
        "wav": "{data_root}/" + rel,
        "label": label,
        "words": spoken_word_of(path, label),
        "spk_id": speaker_of(path),
        "duration": info.frames / info.samplerate,
    }


def _already_prepared(save_folder, options):
    path = os.path.join(save_folder, OPTIONS_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f) == options and all(
            os.path.isfile(os.path.join(save_folder, f"{s}.json")) for s in SPLITS + ("split",)
        )
