"""Word and character error rates for ASR outputs.

Rates are corpus-level (total edits / total reference tokens), which is what
ASR papers and SpeechBrain's ``ErrorRateStats`` report; a mean of
per-utterance rates would over-weight short utterances.
"""
import re
from collections import namedtuple

EditCounts = namedtuple("EditCounts", ["substitutions", "deletions", "insertions"])


def normalize_text(s):
    """Normalizes a transcript before WER scoring (Whisper-style, basic).

    Lowercases, turns punctuation and symbols into spaces (keeping apostrophes
    that sit inside a word, as in "don't"), and collapses whitespace.

    Arguments
    ---------
    s : str
        Raw transcript.

    Returns
    -------
    str
        The normalized transcript.

    Example
    -------
    >>> normalize_text("  Hello, World! Don't 'quote' me...  ")
    "hello world don't quote me"
    """
    if not isinstance(s, str):
        raise ValueError(f"normalize_text expects a str, got {type(s).__name__}")
    # Typographic apostrophes are common in ASR outputs; unify them first.
    s = s.lower().replace("\u2019", "'")
    # Replace (not delete) punctuation so "a,b" stays two words.
    s = re.sub(r"[^\w\s']|_", " ", s)
    # Apostrophes used as quotes are not part of a word.
    s = re.sub(r"(?<!\w)'|'(?!\w)", " ", s)
    return " ".join(s.split())


def edit_distance(ref_tokens, hyp_tokens):
    """Counts the edits of a minimal (Levenshtein) alignment.

    Ties between equally short alignments are broken like Kaldi's
    ``compute-wer`` (and SpeechBrain): insertion, then deletion, then
    substitution, so the counts match those tools.

    Arguments
    ---------
    ref_tokens : sequence
        Reference tokens (a list of words, or a str for characters).
    hyp_tokens : sequence
        Hypothesis tokens.

    Returns
    -------
    EditCounts
        Named tuple ``(substitutions, deletions, insertions)``.

    Example
    -------
    >>> edit_distance("the cat sat".split(), "the bat sat down".split())
    EditCounts(substitutions=1, deletions=0, insertions=1)
    """
    ref, hyp = list(ref_tokens), list(hyp_tokens)
    # Each cell holds (cost, subs, dels, ins); two rows suffice because the
    # counts travel along with the chosen predecessor.
    prev = [(j, 0, 0, j) for j in range(len(hyp) + 1)]
    for i, r in enumerate(ref, start=1):
        curr = [(i, 0, i, 0)]
        for j, h in enumerate(hyp, start=1):
            ins, dele, diag = curr[j - 1], prev[j], prev[j - 1]
            sub = int(r != h)
            if diag[0] + sub < ins[0] + 1 and diag[0] + sub < dele[0] + 1:
                curr.append((diag[0] + sub, diag[1] + sub, diag[2], diag[3]))
            elif dele[0] < ins[0]:
                curr.append((dele[0] + 1, dele[1], dele[2] + 1, dele[3]))
            else:
                curr.append((ins[0] + 1, ins[1], ins[2], ins[3] + 1))
        prev = curr
    return EditCounts(*prev[-1][1:])


def _check_pairs(refs, hyps):
    # A bare string is one utterance, not a list of one-character utterances.
    refs = [refs] if isinstance(refs, str) else list(refs)
    hyps = [hyps] if isinstance(hyps, str) else list(hyps)
    if not refs:
        raise ValueError("refs is empty; pass at least one reference transcript")
    if len(refs) != len(hyps):
        raise ValueError(
            f"refs and hyps must pair up one-to-one, got {len(refs)} refs "
            f"and {len(hyps)} hyps"
        )
    for name, texts in (("refs", refs), ("hyps", hyps)):
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(
                    f"{name}[{k}] must be a str, got {type(t).__name__}"
                )
    return refs, hyps


def _error_rate(refs, hyps, tokenize, normalize, unit):
    refs, hyps = _check_pairs(refs, hyps)
    edits = n_ref = 0
    for ref, hyp in zip(refs, hyps):
        if normalize:
            ref, hyp = normalize_text(ref), normalize_text(hyp)
        ref_tokens = tokenize(ref)
        edits += sum(edit_distance(ref_tokens, tokenize(hyp)))
        n_ref += len(ref_tokens)
    if n_ref == 0:
        raise ValueError(
            f"the references contain no {unit}s, so the rate is undefined; "
            "drop utterances with empty references"
        )
    return edits / n_ref


def word_error_rate(refs, hyps, normalize=True):
    """Corpus-level word error rate: total word edits / total reference words.

    Arguments
    ---------
    refs : list of str
        Reference transcripts (a single str counts as one utterance).
    hyps : list of str
        Hypotheses, same order and length as ``refs``.
    normalize : bool
        Apply :func:`normalize_text` to both sides first (Whisper-style WER,
        the default, so raw model output can be passed as is). ``False``
        scores the text as given, like SpeechBrain's ``ErrorRateStats``.

    Returns
    -------
    float
        The WER as a fraction (0.25 means 25 %); can exceed 1.

    Example
    -------
    >>> word_error_rate(["the cat sat", "hello world"], ["the bat sat", "hello"])
    0.4
    >>> word_error_rate(["Hello, world!"], ["hello world"])
    0.0
    >>> word_error_rate(["Hello, world!"], ["hello world"], normalize=False)
    1.0
    """
    return _error_rate(refs, hyps, str.split, normalize, "word")


def _chars(text):
    # Words joined by single spaces, spaces counted: SpeechBrain's
    # split_tokens CER and jiwer's CER do the same.
    return list(" ".join(text.split()))


def char_error_rate(refs, hyps, normalize=True):
    """Corpus-level character error rate, spaces between words included.

    Whitespace runs are collapsed to one space before counting characters.

    Arguments
    ---------
    refs : list of str
        Reference transcripts (a single str counts as one utterance).
    hyps : list of str
        Hypotheses, same order and length as ``refs``.
    normalize : bool
        Apply :func:`normalize_text` to both sides first (default); ``False``
        scores the text as given.

    Returns
    -------
    float
        The CER as a fraction.

    Example
    -------
    >>> char_error_rate(["abcd"], ["abxd"])
    0.25
    """
    return _error_rate(refs, hyps, _chars, normalize, "character")
