"""NeMo JSON-lines manifests: validation, atomic writing, and the Speech Commands split.

A NeMo ASR manifest has one JSON object per line with ``audio_filepath``,
``duration`` (seconds) and ``text``. A relative ``audio_filepath`` is resolved
against the manifest's folder, as NeMo does.

Example
-------
>>> import json, os, tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> rows = [{"audio_filepath": "a.wav", "duration": 1.0, "text": "yes"}]
>>> path = write_manifest(os.path.join(tmp.name, "m.json"), rows)
>>> read_manifest(path, check_audio=False)[0]["text"]
'yes'
>>> read_manifest(path, min_rows=2, check_audio=False)
Traceback (most recent call last):
...
esc_plugin.nemo.errors.ManifestError: ... holds 1 utterance(s) but 2 are needed ...
>>> tmp.cleanup()
"""
import json
import os
from pathlib import Path

from ..core.io import write_bytes
from ..datasets.speech_commands import speaker_of, speaker_split
from .errors import ManifestError

REQUIRED_KEYS = ("audio_filepath", "duration", "text")
#: The ten Speech Commands classes that are spoken words (the folder name is the transcript).
SPEECH_COMMANDS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def resolve_audio_path(audio_filepath, manifest_path):
    """``audio_filepath`` as NeMo reads it: relative paths are taken from the manifest's folder."""
    path = Path(os.path.expanduser(str(audio_filepath)))
    if not path.is_absolute():
        path = Path(manifest_path).resolve().parent / path
    return path


def read_manifest(path, min_rows=None, check_audio=True):
    """Read and validate a NeMo JSON-lines manifest.

    Arguments
    ---------
    path : str or Path
        The manifest.
    min_rows : int, optional
        Raise :class:`ManifestError` if it holds fewer utterances.
    check_audio : bool
        Check that every ``audio_filepath`` exists.

    Returns
    -------
    list of dict
        One dict per utterance, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"manifest '{path}' not found: pass the path of a NeMo JSON-lines manifest (one "
            '{"audio_filepath": ..., "duration": ..., "text": ...} per line); '
            "for Speech Commands, esc_plugin.nemo.speech_commands_manifests writes them (run by "
            "recipes/NeMo/asr/train_conformer_ctc.py into data.manifest_dir)."
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}, line {number}: not valid JSON ({exc.msg}); a NeMo manifest "
                                    "holds one JSON object per line.") from exc
            missing = [k for k in REQUIRED_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ManifestError(f"{path}, line {number}: missing key(s) {missing}; every line needs "
                                    f"{list(REQUIRED_KEYS)}.")
            if check_audio and not resolve_audio_path(row["audio_filepath"], path).is_file():
                raise ManifestError(f"{path}, line {number}: audio file "
                                    f"'{resolve_audio_path(row['audio_filepath'], path)}' not found "
                                    "(relative paths are read from the manifest's folder).")
            rows.append(row)
    if min_rows is not None and len(rows) < min_rows:
        raise ManifestError(
            f"manifest '{path}' holds {len(rows)} utterance(s) but {min_rows} are needed "
            f"(n_samples={min_rows}): lower n_samples or use a larger calibration manifest."
        )
    return rows


def write_manifest(path, rows):
    """Write ``rows`` as a JSON-lines manifest, atomically; returns ``path``."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_bytes(os.fspath(path), text.encode("utf-8"))
    return path


def split_by_speaker(clips, n_calibration, test_fraction, seed):
    """Speaker-disjoint (train, calibration, test) split of ``clips`` (paths).

    :func:`esc_plugin.datasets.speech_commands.speaker_split` (speaker id:
    :func:`~esc_plugin.datasets.speech_commands.speaker_of`, the hex id before
    ``_nohash_`` without the word prefix of ``_unknown_`` clips). Speakers are
    shuffled with ``seed``. Calibration takes whole speakers, in that order,
    skipping any that would overshoot, until it holds exactly
    ``n_calibration`` clips; test then takes the next speakers until it holds
    at least ``test_fraction`` of all clips; every other speaker is for
    training. Each split is sorted.

    Example
    -------
    >>> clips = [f"{w}/{s}_nohash_{i}.flac" for w in ("yes", "no") for s in "abcdefgh" for i in range(2)]
    >>> train, calib, test = split_by_speaker(clips, 4, 0.25, seed=0)
    >>> len(calib), len(test), len(train)
    (4, 8, 20)
    >>> {speaker_of(c) for c in calib} & {speaker_of(c) for c in train + test}
    set()
    """
    try:
        split = speaker_split(clips, n_calibration, test_fraction, seed)
    except ValueError as exc:
        raise ManifestError(f"{exc} (n_calibration={n_calibration}, seed={seed}).") from exc
    return sorted(split["train"]), sorted(split["calib"]), sorted(split["test"])


def speech_commands_manifests(data_dir, out_dir, n_calibration=100, test_fraction=0.2, seed=0,
                              words=SPEECH_COMMANDS_WORDS):
    """Write ``train.json``, ``calibration.json`` and ``test.json`` for Speech Commands words.

    Each clip's transcript is its folder name (one of ``words``); the split is
    :func:`split_by_speaker`. Audio paths are absolute (the data stays where it is).

    Arguments
    ---------
    data_dir : str or Path
        The Speech Commands folder (``<label>/*.flac``), e.g. ``../shared/data/speech_commands``.
    out_dir : str or Path
        Where the three manifests (and ``split.json``, the split's facts) are written, atomically.
    n_calibration : int
        Exact number of calibration clips.
    test_fraction : float
        Smallest share of all clips that goes to the test split.
    seed : int
        Seed of the speaker shuffle.
    words : sequence of str
        The classes used (default: the ten spoken words; ``_silence_`` and
        ``_unknown_`` have no transcript).

    Returns
    -------
    dict
        ``{"train": path, "calibration": path, "test": path}``.
    """
    import soundfile

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    clips = []
    for word in words:
        folder = data_dir / word
        if not folder.is_dir():
            raise ManifestError(f"Speech Commands folder '{folder}' not found: pass the folder that holds "
                                f"{', '.join(words)} (e.g. ../shared/data/speech_commands, or set ESC_SHARED).")
        clips += sorted(str(p.resolve()) for p in folder.glob("*.flac"))
    splits = dict(zip(("train", "calibration", "test"),
                      split_by_speaker(clips, n_calibration, test_fraction, seed)))
    paths, facts = {}, {"data_dir": str(data_dir), "seed": seed, "words": list(words)}
    for name, group in splits.items():
        rows = [{"audio_filepath": c, "duration": round(soundfile.info(c).duration, 4),
                 "text": Path(c).parent.name} for c in group]
        paths[name] = str(write_manifest(out_dir / f"{name}.json", rows))
        facts[name] = {"utterances": len(rows), "speakers": len({speaker_of(c) for c in group})}
    write_bytes(str(out_dir / "split.json"), (json.dumps(facts, indent=2) + "\n").encode())
    return paths
