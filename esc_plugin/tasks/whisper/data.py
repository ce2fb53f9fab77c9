"""Whisper task data: which clips there are, how they are split, their references.

Clips with transcripts (18 in all):
  * ``data/sb_samples/ASR_train.json`` + ``ASR_dev.json``: 10 clips of 2
    speakers (spk1, spk2); the ``wav`` field uses ``{data_root}``, which is
    the ``data/sb_samples/ASR`` folder; reference = the ``words`` field.
  * ``data/ljspeech``: LJ001-0001 ... LJ001-0008 (one speaker), reference =
    the normalized-text column of ``metadata.csv``; 22.05 kHz, resampled to
    16 kHz.

Two SpeechBrain references do not match their audio (spk2_snt5 "KEN PAIRS
LACK FULL FLAVOR" is spoken as "jump the fence and hurry up the bank";
spk2_snt3 is "tear a thin sheet from the yellow pad"), so they set a WER
floor; they are kept as shipped.

Untranscribed calibration utterances: ``data/librispeech_speakers``
(LibriSpeech test-other, 10 speakers x 10), listed by :func:`list_librispeech`
and chosen by :func:`select_librispeech`.

Both selections use :func:`speaker_round_robin`, so any prefix of the order is
spread over the speakers.
"""
import csv
import json
import random
from pathlib import Path
from typing import Dict, List, Optional

from esc_plugin.core.errors import ConfigError
from esc_plugin.tasks.audio import load_audio, require_path

SAMPLE_RATE = 16000
LJ_IDS = [f"LJ001-{i:04d}" for i in range(1, 9)]
LIBRISPEECH_DIR = "librispeech_speakers"


def load_clips(root: Path) -> List[dict]:
    """All 18 transcribed clips as dicts(id, speaker, wav (16 kHz), ref)."""
    sb = require_path(root / "data" / "sb_samples", "SpeechBrain sample folder")
    clips = []
    for name in ("ASR_train.json", "ASR_dev.json"):
        meta = json.loads(require_path(sb / name, name).read_text())
        for cid, ex in meta.items():
            path = Path(ex["wav"].replace("{data_root}", str(sb / "ASR")))
            clips.append(dict(id=cid, speaker=ex.get("spk_id", cid.split("_")[0]),
                              wav=load_audio(require_path(path, f"clip {cid}"), SAMPLE_RATE),
                              ref=ex["words"]))
    lj = require_path(root / "data" / "ljspeech", "LJSpeech folder")
    with open(require_path(lj / "metadata.csv", "LJSpeech metadata.csv"), newline="", encoding="utf-8") as f:
        rows = {r[0]: r for r in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE)}
    for cid in LJ_IDS:
        if cid not in rows:
            raise FileNotFoundError(f"{cid} missing from {lj / 'metadata.csv'}")
        wav = load_audio(require_path(lj / "wavs" / f"{cid}.wav", f"clip {cid}"), SAMPLE_RATE)
        clips.append(dict(id=cid, speaker="LJ", wav=wav, ref=rows[cid][2]))
    return clips


def speaker_round_robin(items: List[dict], seed: int) -> List[dict]:
    """Order ``items`` (dicts with ``id`` and ``speaker``) so that any prefix
    is spread over the speakers: each speaker's items sorted by id and
    shuffled with ``seed``, then taken round-robin over the sorted speakers.

    Example
    -------
    >>> items = [dict(id=f"{s}{i}", speaker=s) for s in "ab" for i in range(3)]
    >>> [x["speaker"] for x in speaker_round_robin(items, 0)]
    ['a', 'b', 'a', 'b', 'a', 'b']
    """
    groups: Dict[str, list] = {}
    for c in sorted(items, key=lambda c: c["id"]):
        groups.setdefault(c["speaker"], []).append(c)
    rng = random.Random(seed)
    order_lists = []
    for spk in sorted(groups):
        g = list(groups[spk])
        rng.shuffle(g)
        order_lists.append(g)
    order = []
    for k in range(max((len(g) for g in order_lists), default=0)):
        order += [g[k] for g in order_lists if k < len(g)]
    return order


def split_clips(clips: List[dict], n_calib: Optional[int], seed: int):
    """Round-robin over per-speaker seeded shuffles; first n_calib -> calib.

    Deterministic and clip-disjoint (with only 3 speakers it cannot be
    speaker-disjoint); ``n_calib=None`` takes half of the clips.
    """
    order = speaker_round_robin(clips, seed)
    if n_calib is None:
        n_calib = len(order) // 2
    if not 0 < n_calib < len(order):
        raise ConfigError(f"n_calib must be in 1..{len(order) - 1}, got {n_calib}")
    return order[:n_calib], order[n_calib:]


def list_librispeech(root: Path) -> List[dict]:
    """The untranscribed LibriSpeech utterances: dicts(id, speaker, path)."""
    folder = require_path(root / "data" / LIBRISPEECH_DIR, "LibriSpeech speaker folder")
    utts = [dict(id=f.stem, speaker=spk.name, path=f)
            for spk in sorted(p for p in folder.iterdir() if p.is_dir())
            for f in sorted(spk.glob("*.flac"))]
    if not utts:
        raise FileNotFoundError(f"no <speaker>/*.flac files under {folder}")
    return utts


def select_librispeech(root: Path, n_calib: int, seed: int) -> List[dict]:
    """First ``n_calib`` utterances in speaker round-robin order (100 = all
    10 speakers x 10), with their 16 kHz waveforms loaded (``wav``)."""
    order = speaker_round_robin(list_librispeech(root), seed)
    if not 0 < n_calib <= len(order):
        raise ConfigError(f"n_calib must be in 1..{len(order)} for calib='librispeech' "
                          f"({len(order)} utterances in {root / 'data' / LIBRISPEECH_DIR}), got {n_calib}")
    return [dict(u, wav=load_audio(u["path"], SAMPLE_RATE)) for u in order[:n_calib]]


def target_text(ref: str) -> str:
    """Reference text as Whisper would write it, for teacher forcing.

    The SpeechBrain references are all upper case without punctuation; they
    are put in sentence case with a final period (Whisper's style) so the
    cross-entropy measures the acoustic match, not casing. LJSpeech's
    normalized text is already in that style. A leading space matches
    Whisper's first-token convention.

    >>> target_text("THE BIRCH CANOE"), target_text("Printing, in the only sense.")
    (' The birch canoe.', ' Printing, in the only sense.')
    """
    ref = ref.strip()
    if ref.isupper():
        ref = ref.lower()
        ref = ref[0].upper() + ref[1:] + "."
    return " " + ref
