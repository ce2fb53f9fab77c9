"""Tests for esc_plugin.metrics against independent references.

SpeechBrain (WER/CER, EER, minDCF) and sklearn (mAP) serve as references;
PESQ/STOI are checked on a real VoiceBank-DEMAND utterance.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import esc_plugin.metrics as M
from esc_plugin.metrics import (
    accuracy,
    char_error_rate,
    classification_error,
    edit_distance,
    equal_error_rate,
    mean_average_precision,
    mean_pesq,
    mean_stoi,
    mel_l1,
    min_dcf,
    normalize_text,
    pesq_score,
    stoi_score,
    word_error_rate,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ESC_SHARED", REPO.parent / "shared"))
VOICEBANK = SHARED / "data" / "voicebank_demand"


def test_public_api_documented():
    for name in M.__all__:
        obj = getattr(M, name)
        assert obj.__doc__ and ("Example" in obj.__doc__ or name == "EditCounts")


# --------------------------------------------------------------------- text

PAIRS = [
    ("the cat sat on the mat", "the cat sit on mat"),
    ("hello world", "hello there world"),
    ("a b c d e", ""),
    ("speech recognition is hard", "speech wreck ignition is hard"),
    ("one two three", "one two three"),
    ("x", "y z w"),
]


def _random_pairs(n=40, seed=0):
    # Tiny vocabulary -> many equally short alignments, which exercises the
    # S/D/I tie-breaking as well as the totals.
    rng = np.random.default_rng(seed)
    vocab = ["a", "b", "c", "d"]
    return [
        (
            " ".join(rng.choice(vocab, rng.integers(1, 9))),
            " ".join(rng.choice(vocab, rng.integers(0, 9))),
        )
        for _ in range(n)
    ]


def _speechbrain_summary(pairs, split_tokens):
    from speechbrain.utils.metric_stats import ErrorRateStats

    stats = ErrorRateStats(split_tokens=split_tokens, space_token=" ")
    stats.append(
        ids=[str(k) for k in range(len(pairs))],
        predict=[h.split() for _, h in pairs],
        target=[r.split() for r, _ in pairs],
    )
    return stats.summarize()


@pytest.mark.parametrize("pairs", [PAIRS, _random_pairs()], ids=["fixed", "random"])
def test_wer_matches_speechbrain(pairs):
    refs, hyps = zip(*pairs)
    sb = _speechbrain_summary(pairs, split_tokens=False)
    wer = word_error_rate(list(refs), list(hyps), normalize=False)
    assert wer * 100 == pytest.approx(sb["WER"])
    # These pairs are already normalized, so the default gives the same.
    assert word_error_rate(list(refs), list(hyps)) == wer
    counts = np.sum([edit_distance(r.split(), h.split()) for r, h in pairs], axis=0)
    assert tuple(counts) == (sb["substitutions"], sb["deletions"], sb["insertions"])


@pytest.mark.parametrize("pairs", [PAIRS[:2] + PAIRS[3:], _random_pairs(seed=1)])
def test_cer_matches_speechbrain(pairs):
    refs, hyps = zip(*pairs)
    sb = _speechbrain_summary(pairs, split_tokens=True)
    cer = char_error_rate(list(refs), list(hyps), normalize=False)
    assert cer * 100 == pytest.approx(sb["WER"])


def test_wer_known_values():
    # 1 substitution + 1 deletion over 6 reference words.
    assert word_error_rate(["the cat sat on the mat"], ["the cat sit on mat"]) == 2 / 6
    # Corpus level: (0 + 2) / (1 + 2), not mean(0, 1) = 0.5.
    assert word_error_rate(["yes", "no way"], ["yes", ""]) == pytest.approx(2 / 3)
    assert word_error_rate("a b", "a b c d") == 1.0  # insertions can exceed refs
    assert edit_distance("kitten", "sitting") == (2, 0, 1)
    assert char_error_rate(["ab  cd"], ["ab cd"]) == 0.0  # whitespace collapsed


def test_normalize_text():
    assert normalize_text("Hello,   WORLD!") == "hello world"
    assert normalize_text("I don\u2019t know; 'quoted' rock-n-roll.") == (
        "i don't know quoted rock n roll"
    )
    assert normalize_text("  ") == ""
    assert word_error_rate(["It's OK."], ["it's ok"]) == 0.0
    assert word_error_rate(["It's OK."], ["it's ok"], normalize=False) == 1.0
    assert char_error_rate(["Hi, there"], ["hi there"]) == 0.0


@pytest.mark.parametrize(
    "refs, hyps, match",
    [
        ([], [], "empty"),
        (["a b"], ["a", "b"], "one-to-one"),
        ([""], ["a"], "no words"),
        (["a"], [None], "must be a str"),
    ],
)
def test_wer_invalid_input(refs, hyps, match):
    with pytest.raises(ValueError, match=match):
        word_error_rate(refs, hyps)


# ------------------------------------------------------------- verification


def _score_sets(seed):
    rng = np.random.default_rng(seed)
    pos = rng.normal(1.0, 1.0, rng.integers(20, 300))
    neg = rng.normal(-0.5, 1.2, rng.integers(50, 600))
    if seed % 2:  # coarse scores create ties between and within the sets
        pos, neg = np.round(pos, 1), np.round(neg, 1)
    return torch.tensor(pos).float(), torch.tensor(neg).float()


@pytest.mark.parametrize("seed", range(6))
def test_eer_matches_speechbrain(seed):
    from speechbrain.utils.metric_stats import EER

    pos, neg = _score_sets(seed)
    eer, thr = equal_error_rate(pos, neg)
    sb_eer, sb_thr = EER(pos, neg)
    assert 0.0 < eer < 0.5
    assert eer == pytest.approx(sb_eer, abs=1e-7)
    assert thr == pytest.approx(sb_thr, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p_target, c_miss, c_fa", [(0.01, 1, 1), (0.05, 10, 1)])
def test_min_dcf_matches_speechbrain(seed, p_target, c_miss, c_fa):
    from speechbrain.utils.metric_stats import minDCF

    pos, neg = _score_sets(seed)
    kw = dict(p_target=p_target, c_miss=c_miss, c_fa=c_fa)
    sb_dcf, sb_thr = minDCF(pos, neg, **kw)
    raw, thr = min_dcf(pos, neg, normalize=False, **kw)
    assert raw == pytest.approx(sb_dcf, rel=1e-6, abs=1e-9)
    assert thr == pytest.approx(sb_thr, abs=1e-6)
    # NIST normalization: divide by the cost of the best constant decision.
    norm, _ = min_dcf(pos, neg, **kw)
    c_default = min(c_miss * p_target, c_fa * (1 - p_target))
    assert norm == pytest.approx(sb_dcf / c_default, rel=1e-6)
    assert 0.0 < norm <= 1.0


def test_verification_edge_cases():
    # Lowest threshold that separates the sets, as in SpeechBrain.
    assert equal_error_rate(np.array([2.0, 3.0]), [0.0, 1.0]) == (0.0, 1.0)
    assert min_dcf([2.0, 3.0], [0.0, 1.0])[0] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        equal_error_rate([0.5, float("nan")], [0.1])
    with pytest.raises(ValueError, match="empty"):
        min_dcf([0.5], [])
    with pytest.raises(ValueError, match="p_target"):
        min_dcf([0.5], [0.1], p_target=0.0)


# -------------------------------------------------------------- enhancement


@pytest.fixture(scope="module")
def speech():
    sf = pytest.importorskip("soundfile")
    clean_path = VOICEBANK / "p232_010_clean.wav"
    noisy_path = VOICEBANK / "p232_010_noisy.wav"
    if not (clean_path.exists() and noisy_path.exists()):
        pytest.skip(
            f"VoiceBank-DEMAND sample not found under {VOICEBANK}; "
            "set ESC_SHARED to the shared data folder"
        )
    clean, sr = sf.read(clean_path, dtype="float32")
    noisy, sr_noisy = sf.read(noisy_path, dtype="float32")
    assert sr == sr_noisy == 16000
    return clean, noisy, sr


def _add_noise(x, snr_db, seed=0):
    noise = np.random.default_rng(seed).standard_normal(x.size).astype(x.dtype)
    scale = np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return x + scale * noise


def test_pesq_real_speech(speech):
    clean, noisy, sr = speech
    self_score = pesq_score(clean, clean, sr)
    noisy_score = pesq_score(clean, noisy, sr)
    assert self_score > 4.0
    assert 1.0 <= noisy_score < self_score - 1.0
    # torch input gives the same number as numpy input.
    assert pesq_score(torch.from_numpy(clean), torch.from_numpy(noisy)) == noisy_score
    assert pesq_score(clean, _add_noise(clean, 0), sr) < pesq_score(
        clean, _add_noise(clean, 20), sr
    )


def test_pesq_narrowband(speech):
    from scipy.signal import resample_poly

    clean8k = resample_poly(speech[0], 1, 2)
    assert pesq_score(clean8k, clean8k, 8000) > 4.0
    assert pesq_score(clean8k, _add_noise(clean8k, 5), 8000) < 3.5


def test_stoi_real_speech(speech):
    clean, noisy, sr = speech
    scores = [stoi_score(clean, _add_noise(clean, snr), sr) for snr in (20, 5, -5, -15)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1] + 0.2
    assert stoi_score(clean, clean, sr) == pytest.approx(1.0)
    assert 0.0 < stoi_score(clean, noisy, sr) < 1.0
    assert stoi_score(clean, noisy, sr, extended=True) < stoi_score(clean, noisy, sr)


def test_batch_helpers_ignore_padding(speech):
    clean, noisy, sr = speech
    n = clean.size
    short = n - 8000
    # Pad the shorter pair with zeros, as a collate function would.
    refs = np.zeros((2, n), np.float32)
    degs = np.zeros((2, n), np.float32)
    refs[0], degs[0] = clean, noisy
    refs[1, :short], degs[1, :short] = clean[:short], noisy[:short]
    lengths = torch.tensor([n, short])
    expected_pesq = (
        pesq_score(clean, noisy) + pesq_score(clean[:short], noisy[:short])
    ) / 2
    assert mean_pesq(refs, degs, sr, lengths=lengths) == pytest.approx(expected_pesq)
    expected_stoi = (
        stoi_score(clean, noisy, sr) + stoi_score(clean[:short], noisy[:short], sr)
    ) / 2
    result = mean_stoi(list(refs), list(degs), sr, lengths)
    assert result == pytest.approx(expected_stoi)
    with pytest.raises(ValueError, match="absolute"):
        mean_stoi(refs, degs, sr, lengths=[1.0, 0.8])


def test_enhancement_invalid_input(speech):
    clean, noisy, sr = speech
    with pytest.raises(ValueError, match="same length"):
        pesq_score(clean, noisy[:-1], sr)
    with pytest.raises(ValueError, match="same length"):
        stoi_score(clean[1:], noisy, sr)
    with pytest.raises(ValueError, match="16000 Hz"):
        pesq_score(clean, noisy, 22050)
    with pytest.raises(ValueError, match="positive int"):
        stoi_score(clean, noisy, 0)
    with pytest.raises(ValueError, match="1-D"):
        pesq_score(clean[None], noisy[None], sr)
    with pytest.raises(ValueError, match="silent"):
        pesq_score(np.zeros(sr), np.zeros(sr), sr)
    with pytest.raises(ValueError, match="silent"):
        stoi_score(np.zeros(sr), clean[:sr], sr)
    with pytest.raises(ValueError, match="too short"):
        pesq_score(clean[:2000], clean[:2000], sr)
    with pytest.raises(ValueError, match="item 1"):
        mean_pesq([clean, np.zeros(sr)], [noisy, np.zeros(sr)], sr)
    with pytest.raises(ValueError, match="empty"):
        mean_stoi([], [], sr)


# ----------------------------------------------------------- classification


def test_classification_error_and_accuracy():
    logits = torch.tensor(
        [[2.0, 0.1, 0.0], [0.3, 0.9, 0.1], [0.0, 0.2, 0.1], [1.0, 0.0, 0.0]]
    )
    labels = torch.tensor([0, 1, 2, 0])
    assert classification_error(logits, labels) == 0.25
    assert accuracy(logits, labels) == 0.75
    assert classification_error(np.array([1, 1, 0]), [1, 1, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one-to-one"):
        accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="NaN"):
        accuracy([[float("nan"), 0.0]], [0])
    with pytest.raises(ValueError, match="integer"):
        accuracy([0.5, 1.0], [0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_map_matches_sklearn_multiclass(seed):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    n, c = 200, 10
    labels = rng.integers(0, c - 2, n)  # the last two classes never occur
    scores = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    onehot = np.eye(c)[labels]
    present = onehot.sum(0) > 0
    expected = average_precision_score(onehot[:, present], scores[:, present])
    result = mean_average_precision(scores, labels, num_classes=c)
    assert result == pytest.approx(expected)
    assert mean_average_precision(torch.tensor(scores), torch.tensor(labels)) == (
        pytest.approx(expected)
    )


def test_map_matches_sklearn_multilabel():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(7)
    targets = (rng.random((150, 6)) < 0.3).astype(int)
    scores = np.round(targets * 0.8 + rng.random((150, 6)), 2)
    expected = average_precision_score(targets, scores, average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expected)
    assert mean_average_precision([[0.9, 0.1], [0.2, 0.8]], [0, 1]) == 1.0


def test_map_invalid_input():
    with pytest.raises(ValueError, match="num_classes"):
        mean_average_precision(np.zeros((3, 4)), [0, 1, 2], num_classes=5)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        mean_average_precision(np.zeros((3, 4)), [0, 1, 4])
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision([[np.nan, 1.0]], [0])
    with pytest.raises(ValueError, match="no class"):
        mean_average_precision(np.zeros((2, 2)), np.zeros((2, 2)))


# ----------------------------------------------------------------- spectral


def test_mel_l1_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 50, 80, generator=gen)
    target = torch.randn(3, 50, 80, generator=gen)
    lengths = torch.tensor([50, 30, 12])
    expected = torch.cat(
        [(pred[b, :n] - target[b, :n]).abs().flatten() for b, n in enumerate(lengths)]
    ).double().mean()
    # Garbage (even NaN) in the padding must not change the result.
    pred[1, 30:] = 1e6
    target[2, 12:] = float("nan")
    assert mel_l1(pred, target, lengths) == pytest.approx(expected.item())
    assert mel_l1(pred.numpy(), target.numpy(), [50, 30, 12]) == pytest.approx(
        expected.item()
    )
    full = torch.zeros(2, 4, 3)
    assert mel_l1(full, full + 0.5) == 0.5


def test_mel_l1_invalid_input():
    x = torch.zeros(2, 10, 80)
    with pytest.raises(ValueError, match="same shape"):
        mel_l1(x, torch.zeros(2, 9, 80))
    with pytest.raises(ValueError, match="relative"):
        mel_l1(x, x, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        mel_l1(x, x, [10, 11])
    with pytest.raises(ValueError, match="NaN"):
        mel_l1(x, torch.full_like(x, float("nan")))
