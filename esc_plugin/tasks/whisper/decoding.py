"""Whisper decoding through the modules' ``forward``: batched greedy decoding, teacher forcing.

The batched greedy decoder keeps a KV cache, calls ``model.model.encoder``
once per batch and ``model.model.decoder`` + ``model.proj_out`` one token at a
time, i.e. through the modules' ``forward``, so module-level quantization
wrappers are exercised (``generate`` is not used). The many small per-token
ops of the decoder suffer badly from OpenMP oversubscription when other
processes compete for the cores: ``num_threads`` / ``decode_threads=1``
helps then.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import _model_device

SOT = 50257  # <|startoftranscript|>
NO_TIMESTAMPS = 50362  # <|notimestamps|>
EOS = 50256  # <|endoftext|>
FIRST_SPECIAL = 50257  # ids >= this are special / timestamp tokens


def _suppress_mask(model: nn.Module, vocab: int, device=None):
    gc = getattr(model, "generation_config", None)
    sup = torch.zeros(vocab, dtype=torch.bool)
    sup[FIRST_SPECIAL:] = True  # no special/timestamp tokens in transcripts
    sup[list(getattr(gc, "suppress_tokens", None) or [])] = True
    sup[EOS] = False
    begin = sup.clone()
    begin[list(getattr(gc, "begin_suppress_tokens", None) or [220, EOS])] = True
    return (sup, begin) if device is None else (sup.to(device), begin.to(device))


@torch.no_grad()
def greedy_decode(model: nn.Module, enc: torch.Tensor, max_new_tokens: int = 100,
                  num_threads: Optional[int] = None) -> List[List[int]]:
    """Batched greedy decoding with a KV cache, on ``enc``'s device.

    Arguments
    ---------
    model : WhisperForConditionalGeneration
    enc : torch.Tensor
        Encoder output (batch, 1500, d_model).
    max_new_tokens : int
        Cap per clip.
    num_threads : int, optional
        Torch intra-op threads while decoding (restored afterwards); None
        leaves the current setting.

    Returns
    -------
    list of list of int
        Generated token ids per clip, without the prompt and the EOS.
    """
    if num_threads is not None:
        prev = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return greedy_decode(model, enc, max_new_tokens)
        finally:
            torch.set_num_threads(prev)
    B, dev = enc.shape[0], enc.device
    inp = torch.tensor([[SOT, NO_TIMESTAMPS]] * B, dtype=torch.long, device=dev)
    cache = None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    sup = begin = None
    for step in range(max_new_tokens):
        dec = model.model.decoder(input_ids=inp, encoder_hidden_states=enc, past_key_values=cache, use_cache=True)
        cache = dec.past_key_values
        logits = model.proj_out(dec.last_hidden_state[:, -1]).float()
        if sup is None:
            sup, begin = _suppress_mask(model, logits.shape[-1], dev)
        logits = logits.masked_fill(begin if step == 0 else sup, float("-inf"))
        nxt = torch.where(done, torch.full_like(done, EOS, dtype=torch.long), logits.argmax(-1))
        out.append(nxt)
        done |= nxt == EOS
        if bool(done.all()):
            break
        inp = nxt[:, None]
    toks = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    return [t[: t.index(EOS)] if EOS in t else t for t in toks]


@torch.no_grad()
def teacher_forced_ce(model: nn.Module, enc: torch.Tensor, targets: Sequence[List[int]]):
    """Sum of token cross-entropies (nats) and token count for ``targets``
    (each followed by EOS) given the prompt <|startoftranscript|><|notimestamps|>."""
    B, dev = enc.shape[0], enc.device
    L = max(len(t) for t in targets) + 1
    inp = torch.full((B, L + 1), EOS, dtype=torch.long)
    lab = torch.full((B, L), -100, dtype=torch.long)
    inp[:, 0], inp[:, 1] = SOT, NO_TIMESTAMPS
    for b, t in enumerate(targets):
        inp[b, 2:2 + len(t)] = torch.tensor(t, dtype=torch.long)
        lab[b, :len(t) + 1] = torch.tensor(list(t) + [EOS], dtype=torch.long)
    inp, lab = inp.to(dev), lab.to(dev)
    dec = model.model.decoder(input_ids=inp, encoder_hidden_states=enc, use_cache=False)
    # position 1 (<|notimestamps|>) predicts the first text token.
    logits = model.proj_out(dec.last_hidden_state[:, 1:]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="sum")
    return ce.item(), int((lab != -100).sum())


@torch.no_grad()
def transcribe_tokens(model: nn.Module, feats: torch.Tensor, batch_size: int = 9,
                      max_new_tokens: int = 100, decode_threads: Optional[int] = None) -> List[List[int]]:
    """Greedy token ids (no prompt, no EOS) of precomputed log-mel features."""
    dev = _model_device(model)
    out = []
    for i in range(0, len(feats), batch_size):
        enc = model.model.encoder(feats[i:i + batch_size].to(dev)).last_hidden_state
        out += greedy_decode(model, enc, max_new_tokens, decode_threads)
    return out


@torch.no_grad()
def transcribe(model: nn.Module, tok, feats: torch.Tensor, batch_size: int = 9,
               max_new_tokens: int = 100, decode_threads: Optional[int] = None) -> List[str]:
    """Greedy transcripts of precomputed log-mel features."""
    return tok.batch_decode(transcribe_tokens(model, feats, batch_size, max_new_tokens, decode_threads),
                            skip_special_tokens=True)
