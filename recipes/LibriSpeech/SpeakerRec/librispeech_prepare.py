"""Speaker-verification trials from LibriSpeech speaker folders.

Writes two SpeechBrain JSON manifests whose items are *trials* (an enrolment
utterance, a test utterance and a same/different-speaker label):

* ``calib_trials.json``: ``n_calib_trials`` trials (default 100) used to
  calibrate quantization;
* ``test_trials.json``: the test trials (default: every pair of test
  utterances).

Split: utterance-disjoint, speakers shared. Each speaker's utterances (sorted
by id, at most ``utterances_per_speaker``) alternate between calibration
(positions 0, 2, 4, ...) and test (1, 3, 5, ...), so no utterance is in both
sets. Why not a speaker split: the embedding models never see any LibriSpeech
speaker in training, so sharing speakers between calibration and test leaks
nothing about the test labels into the model, while with only 10 speakers a
speaker split would leave 5 test speakers (10 impostor speaker pairs), an EER
decided by a handful of voices.

Calibration trials are balanced (half target, half non-target, drawn with
``seed``) and interleaved target / non-target, so the first ``n`` trials of
the manifest, which is what the quantization stage takes, always hold both
kinds. Test trials are every pair of test utterances (``n_test_trials:
null``) or a balanced interleaved sample of ``n_test_trials``.

Layout read: ``<data_folder>/**/<spk>-<chapter>-<utt>.flac`` (the speaker is the
file-name prefix before the first ``-``), i.e. a LibriSpeech subset such as
``LibriSpeech/test-other`` as distributed (``<spk>/<chapter>/*.flac``) or the
flat ``<spk>/*.flac`` folder of ``shared/data/librispeech_speakers``. Paths in
the manifests use ``{data_root}``, replaced by the data folder when loading.

Example
-------
>>> prepare_verification_trials("../shared/data/librispeech_speakers", "results/trials")  # doctest: +SKIP
"""
import itertools
import json
import logging
import os
import random
from collections import OrderedDict
from pathlib import Path

import soundfile as sf

from esc_plugin.core.io import write_json

logger = logging.getLogger(__name__)

CALIB_JSON = "calib_trials.json"
TEST_JSON = "test_trials.json"
OPTIONS_JSON = "trials_options.json"


def prepare_verification_trials(
    data_folder,
    save_folder,
    n_calib_trials=100,
    n_test_trials=None,
    utterances_per_speaker=10,
    max_speakers=None,
    seed=1234,
    skip_prep=False,
):
    """Write ``calib_trials.json`` and ``test_trials.json`` into ``save_folder``.

    Arguments
    ---------
    data_folder : str
        Folder holding LibriSpeech ``.flac`` files (searched recursively).
    save_folder : str
        Where the manifests go. Existing manifests written with the same
        options are kept (re-running a recipe does not rebuild them).
    n_calib_trials : int
        Number of calibration trials (even; half target, half non-target).
    n_test_trials : int or None
        ``None``: every pair of test utterances; an even int: a balanced
        sample of that many trials.
    utterances_per_speaker : int
        Utterances taken per speaker (the first ones by sorted id), split
        alternately between calibration and test.
    max_speakers : int or None
        Keep only the first speakers (sorted by id); ``None`` keeps all.
    seed : int
        Seed of the trial sampling.
    skip_prep : bool
        Do nothing (the manifests are assumed to exist).

    Returns
    -------
    dict
        Counts of the written manifests (utterances, speakers, target and
        non-target trials per split), also stored in ``trials_options.json``.
    """
    if skip_prep:
        return None
    options = dict(
        data_folder=os.path.abspath(data_folder),
        n_calib_trials=n_calib_trials,
        n_test_trials=n_test_trials,
        utterances_per_speaker=utterances_per_speaker,
        max_speakers=max_speakers,
        seed=seed,
    )
    save_folder = Path(save_folder)
    calib_json, test_json = save_folder / CALIB_JSON, save_folder / TEST_JSON
    options_json = save_folder / OPTIONS_JSON
    if calib_json.exists() and test_json.exists() and options_json.exists():
        previous = json.loads(options_json.read_text())
        if previous.get("options") == options:
            logger.info("Verification trials already prepared in %s", save_folder)
            return previous["counts"]

    for name, value in (("n_calib_trials", n_calib_trials), ("n_test_trials", n_test_trials)):
        if value is not None and (value < 2 or value % 2):
            raise ValueError(f"{name} must be an even number >= 2 (half target, half non-target), got {value}")

    by_speaker = _utterances_by_speaker(Path(data_folder), utterances_per_speaker, max_speakers)
    calib_utts = {spk: utts[0::2] for spk, utts in by_speaker.items()}
    test_utts = {spk: utts[1::2] for spk, utts in by_speaker.items()}

    rng = random.Random(seed)
    calib_trials = _make_trials(calib_utts, n_calib_trials, rng, "calibration")
    test_trials = _make_trials(test_utts, n_test_trials, rng, "test")

    data_root = Path(data_folder)
    write_json(calib_json, _manifest(calib_trials, data_root))
    write_json(test_json, _manifest(test_trials, data_root))
    counts = {
        "speakers": len(by_speaker),
        "calibration": _counts(calib_utts, calib_trials),
        "test": _counts(test_utts, test_trials),
    }
    write_json(options_json, {"options": options, "counts": counts})
    logger.info("Verification trials written to %s: %s", save_folder, counts)
    return counts


def speaker_of(path):
    """LibriSpeech speaker id: the file-name prefix before the first ``-``.

    Example
    -------
    >>> speaker_of("test-other/1688/142285/1688-142285-0000.flac")
    '1688'
    """
    return Path(path).name.split("-")[0]


def _utterances_by_speaker(data_folder, utterances_per_speaker, max_speakers):
    if not data_folder.is_dir():
        raise FileNotFoundError(
            f"LibriSpeech folder '{data_folder}' not found: set the recipe's trials_folder (e.g. "
            "--trials_folder=LibriSpeech/test-other, or --data_folder=../shared/data)."
        )
    files = sorted(data_folder.rglob("*.flac"), key=lambda p: p.name)
    by_speaker = OrderedDict()
    for path in files:
        by_speaker.setdefault(speaker_of(path), []).append(path)
    by_speaker = OrderedDict(sorted(by_speaker.items()))
    if max_speakers is not None:
        by_speaker = OrderedDict(list(by_speaker.items())[:max_speakers])
    by_speaker = OrderedDict((s, u[:utterances_per_speaker]) for s, u in by_speaker.items())
    usable = OrderedDict((s, u) for s, u in by_speaker.items() if len(u) >= 4)
    if len(usable) < 2:
        raise ValueError(
            f"Found {len(files)} .flac files under '{data_folder}' but fewer than 2 speakers with "
            ">= 4 utterances (2 for calibration, 2 for test); point the recipe's trials_folder at "
            "LibriSpeech speaker folders."
        )
    return usable


def _make_trials(utts_by_speaker, n_trials, rng, split):
    """All pairs (n_trials None) or a balanced interleaved sample of pairs."""
    utts = [(spk, u) for spk, us in utts_by_speaker.items() for u in us]
    pairs = list(itertools.combinations(utts, 2))
    if n_trials is None:
        return pairs
    targets = [p for p in pairs if p[0][0] == p[1][0]]
    nontargets = [p for p in pairs if p[0][0] != p[1][0]]
    half = n_trials // 2
    if half > len(targets) or half > len(nontargets):
        raise ValueError(
            f"{n_trials} {split} trials need {half} target and {half} non-target pairs, but the "
            f"{split} utterances give {len(targets)} and {len(nontargets)}: ask for fewer trials "
            "or raise utterances_per_speaker."
        )
    targets, nontargets = rng.sample(targets, half), rng.sample(nontargets, half)
    return [pair for both in zip(targets, nontargets) for pair in both]


def _manifest(trials, data_root):
    durations = {}

    def duration(path):
        if path not in durations:
            durations[path] = round(sf.info(str(path)).duration, 3)
        return durations[path]

    manifest = OrderedDict()
    for (enrol_spk, enrol), (test_spk, test) in trials:
        trial_id = f"{enrol.stem}__{test.stem}"
        manifest[trial_id] = {
            "enrol_wav": "{data_root}/" + enrol.relative_to(data_root).as_posix(),
            "test_wav": "{data_root}/" + test.relative_to(data_root).as_posix(),
            "enrol_id": enrol.stem,
            "test_id": test.stem,
            "enrol_spk": enrol_spk,
            "test_spk": test_spk,
            "label": int(enrol_spk == test_spk),
            "enrol_duration": duration(enrol),
            "test_duration": duration(test),
        }
    return manifest


def _counts(utts_by_speaker, trials):
    target = sum(1 for (a, _), (b, _) in trials if a == b)
    return {
        "speakers": len(utts_by_speaker),
        "utterances": sum(len(u) for u in utts_by_speaker.values()),
        "target_trials": target,
        "nontarget_trials": len(trials) - target,
    }
