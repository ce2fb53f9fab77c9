"""The two graphs of a deployed Whisper: encoder (+ cross-attention K/V) and one decoder step.

Both are thin ``nn.Module`` views over a Hugging Face
``WhisperForConditionalGeneration`` (FP32 or quantized by esc_plugin): they
call the model's own submodules (``q_proj``, ``fc1``, layer norms, the token
and position embeddings, ``proj_out``), so every quantized Linear / LayerNorm
/ Embedding traces to the same Q/DQ as in the PyTorch model, and only the
attention wiring is written out here, shape-free, with tensors instead of
Hugging Face ``Cache`` objects (which the TorchScript exporter cannot trace).

Decoder layout: a **static KV cache**. The step graph receives the cache of
every layer's self-attention keys and values, ``self_kv`` of shape
``(2 * layers, batch, heads, cache_len, head_dim)``, and the position ``p`` of
the token it is given; it writes the token's key and value into slot ``p``
(``where(arange(cache_len) == p, new, cache)``) and attends to slots
``<= p``. Shapes never grow, so one graph serves every step (no zero-length
first step, no second "with past" graph), and the runtimes keep the same
shapes from step to step. The cross-attention keys and values are computed
once, by the encoder graph (``cross_kv``, ``(2 * layers, batch, heads, 1500,
head_dim)``).

Attention products: when the quantized model quantizes them
(``QuantConfig(quantize_attention=True)``: the attention module owns an
``esc_attention`` set of quantizers), the graphs call
:func:`esc_plugin.core.attention.quantized_sdpa` with those quantizers, as
the PyTorch model does; otherwise they compute
``softmax(Q K^T + mask) V`` in float (Hugging Face scales Q by
``head_dim ** -0.5`` before the product, and so do these graphs).
"""
import torch
import torch.nn as nn

from ..core.attention import AttentionQuantizers, quantized_sdpa


def _heads(x, heads):
    """(B, T, H*D) -> (B, H, T, D), without reading sizes from the trace."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x):
    """(B, H, T, D) -> (B, T, H*D)."""
    return x.transpose(1, 2).flatten(2)


def _attend(attn, q, k, v, mask=None):
    quantizers = attn._modules.get("esc_attention")
    if isinstance(quantizers, AttentionQuantizers):
        return quantized_sdpa(quantizers, q, k, v, mask, scale=1.0)
    scores = torch.matmul(q, k.transpose(-2, -1))
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class WhisperEncoderGraph(nn.Module):
    """``mel (B, 80, 3000) -> cross_kv (2 * layers, B, heads, 1500, head_dim)``."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.model.encoder
        self.cross = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)
        self.heads = model.config.decoder_attention_heads

    def forward(self, mel):
        hidden = self.encoder(mel).last_hidden_state
        kv = []
        for attn in self.cross:
            kv += [_heads(attn.k_proj(hidden), self.heads), _heads(attn.v_proj(hidden), self.heads)]
        return torch.stack(kv)


class WhisperDecoderStep(nn.Module):
    """One greedy step: ``(tokens (B, 1), position (1,), self_kv, cross_kv) -> (logits (B, vocab), self_kv)``.

    ``position`` is the index of ``tokens`` in the sequence (the prompt
    included); all rows of the batch are at the same position (batched greedy
    decoding advances them together).
    """

    def __init__(self, model):
        super().__init__()
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out
        self.heads = model.config.decoder_attention_heads

    def forward(self, tokens, position, self_kv, cross_kv):
        dec, heads = self.decoder, self.heads
        x = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(tokens, position_ids=position[None])
        slots = torch.arange(self_kv.shape[3], device=tokens.device)
        slot = (slots == position).view(1, 1, -1, 1)
        mask = torch.where(slots <= position, 0.0, torch.finfo(torch.float32).min).view(1, 1, 1, -1)
        new_kv = []
        for i, layer in enumerate(dec.layers):
            attn, h = layer.self_attn, layer.self_attn_layer_norm(x)
            q = _heads(attn.q_proj(h) * attn.scaling, heads)
            k = torch.where(slot, _heads(attn.k_proj(h), heads), self_kv[2 * i])
            v = torch.where(slot, _heads(attn.v_proj(h), heads), self_kv[2 * i + 1])
            new_kv += [k, v]
            x = x + attn.out_proj(_merge(_attend(attn, q, k, v, mask)))
            cross, h = layer.encoder_attn, layer.encoder_attn_layer_norm(x)
            q = _heads(cross.q_proj(h) * cross.scaling, heads)
            x = x + cross.out_proj(_merge(_attend(cross, q, cross_kv[2 * i], cross_kv[2 * i + 1])))
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
        logits = self.proj_out(dec.layer_norm(x)[:, -1])
        return logits, torch.stack(new_kv)
