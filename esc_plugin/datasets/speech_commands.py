"""Speech Commands speakers: the speaker id of a clip and the deterministic speaker-disjoint split.

Clips are named ``<label>/<speaker>_nohash_<n>.<ext>``; the ``_unknown_``
clips carry the spoken word in front, ``_unknown_/<word>_<speaker>_nohash_<n>``.
The speaker id is the hex id right *before* ``_nohash_``, without that word
prefix (so one person's ``_unknown_`` clips of different words, and their
word-class clips, are one speaker). A file without ``_nohash_`` (the
``_silence_`` clips, background noise) is its own speaker,
``<parent folder>/<file name>``.

Every Speech Commands caller uses this module: the honk task
(:mod:`esc_plugin.tasks.honk`), the NeMo manifests
(:mod:`esc_plugin.nemo.manifest`), the SpeechBrain Speech Commands, speaker
and enhancement recipes' data preparation. Pure Python: no torch, SpeechBrain
or NeMo import.

Example
-------
>>> clips = [f"d/{w}/{s}_nohash_{i}.flac" for w in ("yes", "no") for s in "abcdef" for i in range(2)]
>>> clips += [f"d/_unknown_/{w}_{s}_nohash_0.flac" for w in ("bed", "tree") for s in "abcdef"]
>>> split = speaker_split(clips, n_calib=6, test_fraction=0.25, seed=0)
>>> {k: len(v) for k, v in split.items()}
{'calib': 6, 'test': 12, 'train': 18}
>>> speakers = {k: {speaker_of(c) for c in v} for k, v in split.items()}
>>> speakers["calib"] & speakers["test"], speakers["calib"] & speakers["train"], speakers["test"] & speakers["train"]
(set(), set(), set())
>>> sorted(speaker_of(c) for c in split["calib"])  # one speaker: 4 word clips and 2 _unknown_ ones
['e', 'e', 'e', 'e', 'e', 'e']
"""
import os
import random
from typing import Callable, Dict, Hashable, List, Optional, Sequence

NOHASH = "_nohash_"
SPLITS = ("calib", "test", "train")


def _path_of(item):
    """The path of a clip given as a path or as a ``(path, ...)`` tuple / list."""
    return item[0] if isinstance(item, (tuple, list)) else item


def has_speaker_id(path) -> bool:
    """Whether the file name carries a speaker id (``_nohash_``).

    >>> has_speaker_id("yes/0a7c2a8d_nohash_0.wav"), has_speaker_id("_silence_/1024.flac")
    (True, False)
    """
    return NOHASH in os.path.basename(os.fspath(path))


def speaker_of(path) -> str:
    """Speaker id of a Speech Commands clip (``str`` or path-like).

    The hex id right before ``_nohash_`` (without the ``<word>_`` prefix of
    ``_unknown_`` clips); a file without ``_nohash_`` is its own speaker,
    ``<parent folder>/<file name>``.

    Example
    -------
    >>> speaker_of("data/yes/022cd682_nohash_0.flac")
    '022cd682'
    >>> speaker_of("data/_unknown_/tree_7add4c5f_nohash_0.wav.flac")
    '7add4c5f'
    >>> speaker_of("data/_silence_/1024.flac")
    '_silence_/1024.flac'
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if NOHASH in name:
        return name.split(NOHASH)[0].split("_")[-1]
    return f"{os.path.basename(os.path.dirname(path))}/{name}"


def speaker_split(items: Sequence, n_calib: int, test_fraction: float = 1.0, seed: int = 0,
                  speaker: Optional[Callable[[object], Hashable]] = None,
                  group_by_speaker: bool = False) -> Dict[str, List]:
    """Deterministic speaker-disjoint split into ``{"calib", "test", "train"}``.

    The speaker ids (sorted) are shuffled with ``random.Random(seed)``.
    Calibration takes whole speakers in that order, skipping any whose clips
    would overshoot, until it holds exactly ``n_calib`` clips; test then takes
    the next non-calibration speakers, in the same order, until it holds at
    least ``test_fraction`` of all clips; every other speaker is ``train``.
    ``test_fraction=1.0`` (the default) is a two-way split: every
    non-calibration speaker is a test speaker and ``train`` is empty.

    Arguments
    ---------
    items : sequence
        Clips: paths, or tuples / lists whose first element is the path
        (e.g. ``(path, label)``).
    n_calib : int
        Exact number of calibration clips.
    test_fraction : float
        Smallest share of all clips that goes to test, in ``[0, 1]``.
    seed : int
        Seed of the speaker shuffle.
    speaker : callable, optional
        Item -> speaker id (default: :func:`speaker_of` of the item's path).
    group_by_speaker : bool
        False (default): each split keeps the items' input order; True: the
        items of each split are grouped by speaker, speakers in shuffled order.

    Returns
    -------
    dict
        ``{"calib": [...], "test": [...], "train": [...]}`` (lists of items).

    Raises
    ------
    ValueError
        When exactly ``n_calib`` clips cannot be collected from whole
        speakers, or ``test_fraction`` is outside ``[0, 1]``.

    Example
    -------
    >>> clips = [(f"yes/{s}_nohash_{i}.flac", 2) for s in "abcd" for i in range(2)]
    >>> split = speaker_split(clips, 2, seed=0)
    >>> [len(split[k]) for k in ("calib", "test", "train")]
    [2, 6, 0]
    >>> speaker_split(clips, 3)
    Traceback (most recent call last):
    ...
    ValueError: could not collect exactly 3 calibration clips from whole speakers (got 2 of 8 clips): lower n_calib, choose another seed or add data
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    speaker = speaker or (lambda item: speaker_of(_path_of(item)))
    by_speaker: Dict[Hashable, list] = {}
    for item in items:
        by_speaker.setdefault(speaker(item), []).append(item)
    speakers = sorted(by_speaker)
    random.Random(seed).shuffle(speakers)

    assigned, n = {}, 0
    for spk in speakers:
        if n == n_calib:
            break
        if n + len(by_speaker[spk]) <= n_calib:
            assigned[spk] = "calib"
            n += len(by_speaker[spk])
    if n != n_calib:
        raise ValueError(f"could not collect exactly {n_calib} calibration clips from whole speakers "
                         f"(got {n} of {len(items)} clips): lower n_calib, choose another seed or add data")
    n_test, n_min_test = 0, test_fraction * len(items)
    for spk in speakers:
        if n_test >= n_min_test:
            break
        if spk not in assigned:
            assigned[spk] = "test"
            n_test += len(by_speaker[spk])
    split = {name: [] for name in SPLITS}
    if group_by_speaker:
        for spk in speakers:
            split[assigned.get(spk, "train")] += by_speaker[spk]
    else:
        for item in items:
            split[assigned.get(speaker(item), "train")].append(item)
    return split
