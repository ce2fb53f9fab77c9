"""Whisper task functions: forward loop, calibration objective, evaluation, FP32 pseudo-labels.

Objectives (``objective=``), on the calibration clips:

* ``"wer"``: greedy corpus WER (fraction);
* ``"ce"``: mean teacher-forced token cross-entropy (nats) of the reference
  tokens (one decoder pass, smooth);
* ``"wer+ce"`` (default): ``wer + 0.01 * ce``.

With LibriSpeech calibration the references are the FP32 model's own greedy
transcripts (:func:`fp32_pseudo_labels`), so the objective is a label-free
"agreement with FP32". The forward loop runs the encoder and one
teacher-forced decoder pass over the references, so the decoder layers see
in-distribution activations. The evaluation is the greedy WER in percent.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from esc_plugin.metrics.text import word_error_rate

from .decoding import greedy_decode, teacher_forced_ce, transcribe_tokens

OBJECTIVES = ("wer", "ce", "wer+ce")
#: Cap for the FP32 pseudo-labels (half of Whisper's 448-token context; the
#: longest LibriSpeech utterance here, 23 s, needs far fewer).
PSEUDO_LABEL_MAX_TOKENS = 224
#: Calibration decoding stops this many tokens after the longest FP32
#: transcript: a quantized decoder that loops is cut there (its insertions
#: are already counted) instead of running to the cap on every evaluation.
CALIB_TOKEN_MARGIN = 16


def fp32_pseudo_labels(model: nn.Module, tok, feats: torch.Tensor, batch_size: int,
                       decode_threads: Optional[int], source) -> Tuple[list, list, int, dict]:
    """The FP32 model's greedy transcripts of ``feats`` as references.

    Returns ``(tokens, texts, calib_max_tokens, stats)``: the token ids (for
    the teacher-forced CE), their text (for the WER), the calibration
    decoding cap (longest transcript + :data:`CALIB_TOKEN_MARGIN`, at most
    :data:`PSEUDO_LABEL_MAX_TOKENS`) and ``tokens_mean`` / ``tokens_max`` /
    ``hit_cap`` / ``empty``. Raises if every transcript is empty (``source``
    names the audio folder in the message).
    """
    tokens = transcribe_tokens(model, feats, batch_size, PSEUDO_LABEL_MAX_TOKENS, decode_threads)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    lengths = [len(t) for t in tokens]
    calib_max_tokens = min(PSEUDO_LABEL_MAX_TOKENS, max(lengths) + CALIB_TOKEN_MARGIN)
    stats = {"tokens_mean": sum(lengths) / len(lengths), "tokens_max": max(lengths),
             "hit_cap": sum(n >= PSEUDO_LABEL_MAX_TOKENS for n in lengths),
             "empty": sum(not r.strip() for r in texts)}
    if not any(r.strip() for r in texts):
        raise RuntimeError("the FP32 model transcribed every calibration utterance as empty; "
                           "check the audio in " + str(source))
    return tokens, texts, calib_max_tokens, stats


def task_functions(tok, calib: Sequence, evaluation: Sequence, objective: str, batch_size: int,
                   decode_threads: Optional[int], calib_max_tokens: int,
                   max_new_tokens: int) -> Tuple[Callable, Callable, Callable]:
    """``(forward_loop, objective_fn, evaluate)`` of the task.

    ``calib`` and ``evaluation`` are ``(features, reference token ids,
    reference strings)``, cached once at build time; ``calib_max_tokens`` caps
    the greedy decoding in the objective, ``max_new_tokens`` in the evaluation.
    """
    x_cal, t_cal, r_cal = calib
    x_ev, t_ev, r_ev = evaluation

    def _batches(x, t):
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], t[i:i + batch_size]

    @torch.no_grad()
    def run(m: nn.Module, x, t, want_hyp: bool, want_ce: bool, cap: int):
        hyps, ce_sum, n_tok = [], 0.0, 0
        for xb, tb in _batches(x, t):
            enc = m.model.encoder(xb).last_hidden_state
            if want_ce:
                s, n = teacher_forced_ce(m, enc, tb)
                ce_sum, n_tok = ce_sum + s, n_tok + n
            if want_hyp:
                hyps += tok.batch_decode(greedy_decode(m, enc, cap, decode_threads), skip_special_tokens=True)
        return hyps, (ce_sum / max(n_tok, 1))

    def forward_loop(m: nn.Module) -> None:
        # Encoder + one teacher-forced decoder pass over the references, so
        # the decoder layers see realistic (in-distribution) activations.
        run(m, x_cal, t_cal, want_hyp=False, want_ce=True, cap=calib_max_tokens)

    def objective_fn(m: nn.Module) -> float:
        hyps, ce = run(m, x_cal, t_cal, want_hyp=objective != "ce", want_ce=objective != "wer",
                       cap=calib_max_tokens)
        if objective == "ce":
            return ce
        wer = word_error_rate(r_cal, hyps)
        if objective == "wer":
            return wer
        # WER on a few clips moves in steps of one word error, so on its own
        # it is piecewise constant and stalls an evolution strategy; the
        # teacher-forced CE (a fraction of a nat per token against true
        # transcripts, near 0 against the FP32 ones) is smooth in the
        # quantization parameters. With weight 0.01 a 1-nat CE change equals
        # about one word error in 100, so CE breaks ties without overriding
        # the WER.
        return wer + 0.01 * ce

    def evaluate(m: nn.Module) -> Dict[str, float]:
        hyps = run(m, x_ev, t_ev, want_hyp=True, want_ce=False, cap=max_new_tokens)[0]
        return {"wer": 100.0 * word_error_rate(r_ev, hyps), "n": len(r_ev)}

    return forward_loop, objective_fn, evaluate
