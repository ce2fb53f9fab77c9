"""An export-time ``F.multi_head_attention_forward`` whose trace keeps batch and time dynamic.

``torch.onnx.export(..., dynamo=False)`` traces ``nn.MultiheadAttention``
(torch 2.14) with the example's sequence length baked into its reshapes
(``q.view(tgt_len, bsz * num_heads, head_dim)``), for the FP32 model as well:
the exported graph fails in ONNX Runtime for any other length ("The input
tensor cannot be reshaped to the requested shape"). While exporting,
:func:`patched_mha` swaps in :func:`mha_forward`, the same computation written
with shape-free reshapes. The projections still go through
``F._in_projection_packed`` / ``F._in_projection`` and ``F.linear`` (looked up
at call time), so esc_plugin's quantized call sites are the ones calibrated.

Not supported (raises :class:`ExportError`): ``bias_k`` / ``bias_v``,
``add_zero_attn``, ``static_k`` / ``static_v``, dropout in training mode,
``is_causal`` without an ``attn_mask``.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from ..core.attention import quantized_attention_if_owned
from .errors import ExportError


def mha_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                is_causal=False):
    """Drop-in for ``torch.nn.functional.multi_head_attention_forward`` (sequence-first inputs)."""
    unsupported = [name for name, bad in (
        ("bias_k/bias_v", bias_k is not None or bias_v is not None),
        ("add_zero_attn", add_zero_attn),
        ("static_k/static_v", static_k is not None or static_v is not None),
        ("dropout in training mode", training and dropout_p > 0),
        ("is_causal without attn_mask", is_causal and attn_mask is None),
    ) if bad]
    if unsupported:
        raise ExportError(f"nn.MultiheadAttention with {', '.join(unsupported)} is not supported by "
                          "the ONNX export (esc_plugin.export._attention); call qmodel.eval() and "
                          "pass an explicit attn_mask, or exclude the module with QuantConfig(exclude=...).")
    is_batched = query.dim() == 3
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    heads = num_heads
    head_dim = embed_dim_to_check // heads

    if not use_separate_proj_weight:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight,
                                   b_q, b_k, b_v)

    def heads_first(x):  # (L, B, E) -> (B, H, L, D), no size read from the trace
        return x.transpose(0, 1).unflatten(-1, (heads, head_dim)).transpose(1, 2)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)

    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=q.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=q.dtype, check_other=False)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.unflatten(0, (-1, heads))
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        mask = padding if mask is None else mask + padding
    # Eager nn.MultiheadAttention without attention weights goes through F.scaled_dot_product_attention,
    # whose products esc_plugin quantizes under QuantConfig(quantize_attention=True): export the same.
    product = None if need_weights else quantized_attention_if_owned(q, k, v, mask)
    if product is None:
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))  # (B, H, T, S)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        product = torch.matmul(weights, v)
    else:
        weights = None
    out = product.transpose(1, 2).flatten(2)  # (B, T, E)
    out = F.linear(out, out_proj_weight, out_proj_bias).transpose(0, 1)  # (T, B, E)
    if not need_weights:
        weights = None
    elif average_attn_weights:
        weights = weights.mean(dim=1)
    if not is_batched:
        out = out.squeeze(1)
        if weights is not None:
            weights = weights.squeeze(0)
    return out, weights


@contextlib.contextmanager
def patched_mha():
    """Route ``F.multi_head_attention_forward`` through :func:`mha_forward` while active."""
    original = F.multi_head_attention_forward
    F.multi_head_attention_forward = mha_forward
    try:
        yield
    finally:
        F.multi_head_attention_forward = original
