"""One Speech Commands speaker id and split for every caller (esc_plugin.datasets.speech_commands).

Regression: ``_unknown_`` clips are named ``<word>_<speaker>_nohash_<n>``; the
word is not part of the speaker, so one speaker's ``_unknown_`` clips under
different words (and their word-class clips) must land on the same side of
every split: the honk task's, the NeMo manifests', the SpeechBrain Speech
Commands recipe's, and the ECAPA recipe's speaker classes.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esc_plugin.datasets import speech_commands as sc  # noqa: E402

SPEAKERS = [f"{i:08x}" for i in range(0x0a7c2a80, 0x0a7c2a80 + 12)]
WORDS = ("yes", "no")
UNKNOWN_WORDS = ("bed", "tree", "wow")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clips(root="/d"):
    """Word clips and ``_unknown_`` clips of 12 speakers, plus 3 silence clips (each its own speaker)."""
    clips = [(f"{root}/{w}/{s}_nohash_{i}.flac", w) for w in WORDS for s in SPEAKERS for i in range(2)]
    clips += [(f"{root}/_unknown_/{w}_{s}_nohash_0.flac", "_unknown_") for w in UNKNOWN_WORDS for s in SPEAKERS]
    clips += [(f"{root}/_silence_/{i}.flac", "_silence_") for i in range(3)]
    return clips


def _assert_unknown_words_together(groups):
    """``groups``: {split name: [path]}; every speaker's clips (all words) lie in one split."""
    side = {}
    for name, paths in groups.items():
        for p in paths:
            spk = sc.speaker_of(p)
            assert side.setdefault(spk, name) == name, f"speaker {spk} is in {side[spk]} and {name} ({p})"
    for spk in SPEAKERS:
        sides = {name for name, paths in groups.items() for p in paths if spk in Path(p).name}
        assert len(sides) == 1, (spk, sides)


def test_speaker_of():
    assert sc.speaker_of("d/_unknown_/bed_0ea0e2f4_nohash_1.wav.flac") == "0ea0e2f4"
    assert sc.speaker_of(Path("d/yes/0ea0e2f4_nohash_0.flac")) == "0ea0e2f4"
    assert sc.speaker_of("d/_silence_/12.flac") == "_silence_/12.flac"
    assert sc.has_speaker_id("bed_0ea0e2f4_nohash_1.flac") and not sc.has_speaker_id("_silence_/1.flac")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("test_fraction", [0.0, 0.2, 0.5, 1.0])
def test_shared_split_keeps_unknown_words_together(seed, test_fraction):
    clips = _clips()
    split = sc.speaker_split(clips, 10, test_fraction, seed)
    assert len(split["calib"]) == 10 and sum(map(len, split.values())) == len(clips)
    assert len(split["test"]) >= test_fraction * len(clips) or not split["train"]
    _assert_unknown_words_together({k: [p for p, _ in v] for k, v in split.items()})
    assert sc.speaker_split(clips, 10, test_fraction, seed) == split  # deterministic
    grouped = sc.speaker_split(clips, 10, test_fraction, seed, group_by_speaker=True)
    assert {k: sorted(v) for k, v in grouped.items()} == {k: sorted(v) for k, v in split.items()}


def test_split_needs_exact_calibration_count():
    clips = [f"yes/{s}_nohash_{i}.flac" for s in SPEAKERS for i in range(2)]
    with pytest.raises(ValueError, match="exactly 3 calibration clips"):
        sc.speaker_split(clips, 3)
    with pytest.raises(ValueError, match="test_fraction"):
        sc.speaker_split(clips, 2, test_fraction=1.5)


@pytest.mark.parametrize("seed", range(4))
def test_honk_split_keeps_unknown_words_together(seed):
    from esc_plugin.tasks import honk

    clips = [(Path(p), honk.LABELS.index(label)) for p, label in _clips()]
    calib, evalc, calib_spk = honk.speaker_split(clips, 10, seed)
    assert len(calib) == 10 and len(calib) + len(evalc) == len(clips)
    assert calib == [c for c in clips if c in calib] and evalc == [c for c in clips if c not in calib]  # input order
    assert calib_spk == {sc.speaker_of(p) for p, _ in calib}
    _assert_unknown_words_together({"calib": [str(p) for p, _ in calib], "eval": [str(p) for p, _ in evalc]})


@pytest.mark.parametrize("seed", range(4))
def test_nemo_split_keeps_unknown_words_together(seed):
    from esc_plugin.nemo import ManifestError
    from esc_plugin.nemo.manifest import split_by_speaker

    paths = [p for p, _ in _clips()]
    train, calib, test = split_by_speaker(paths, 10, 0.25, seed)
    assert len(calib) == 10 and sorted(train + calib + test) == sorted(paths)
    assert all(group == sorted(group) for group in (train, calib, test))
    _assert_unknown_words_together({"train": train, "calibration": calib, "test": test})
    with pytest.raises(ManifestError, match="exactly 3 calibration clips"):
        split_by_speaker([f"yes/{s}_nohash_{i}.flac" for s in SPEAKERS for i in range(2)], 3, 0.2, seed)


@pytest.mark.parametrize("seed", range(4))
def test_speech_commands_recipe_split_keeps_unknown_words_together(seed):
    prep = _load("sc_prepare_under_test", "recipes/SpeechCommands/speech_commands_prepare.py")
    splits = prep.speaker_split(_clips(), 10, 0.25, seed)
    assert len(splits["calib"]) == 10 and all(splits.values())
    _assert_unknown_words_together({k: [p for p, _ in v] for k, v in splits.items()})
    assert prep.speaker_of is sc.speaker_of


def test_ecapa_speaker_classes_merge_unknown_words(tmp_path):
    prep = _load("ecapa_speakers_under_test", "recipes/LibriSpeech/SpeakerRec/ecapa/speaker_clips_prepare.py")
    for p, _ in _clips(str(tmp_path)):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).touch()
    clips = prep._clips_by_speaker(tmp_path)
    assert sorted(clips) == SPEAKERS  # silence skipped, no "<word>_<speaker>" classes
    assert all(len(v) == 2 * len(WORDS) + len(UNKNOWN_WORDS) for v in clips.values())
    assert all(v == sorted(v) for v in clips.values())
