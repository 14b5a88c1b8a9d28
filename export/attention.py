"""Grouped-query attention for export, without materializing repeated K/V.

HF's eager attention copies every kv head `num_heads / num_kv_heads` times (repeat_kv) before the
matmuls; in an exported decode step that copy costs more than the attention itself (for SmolLM2, 3x the
whole cache per layer per token). Here the query heads that share a kv head are stacked along the
sequence axis instead, so each kv head is read once:

    query [B, H, S, D] -> [B, KV, G*S, D]      (H = KV * G; query head h uses kv head h // G, as in HF)
    scores = query @ key^T  [B, KV, G*S, T]     -> + mask, softmax in float32 -> @ value [B, KV, G*S, D]

Same math as eager attention (verify checks it against HF's eager model), registered with transformers
as the attention implementation `mistral_trt_gqa`.
"""
from __future__ import annotations

import torch
from torch import nn

NAME = "mistral_trt_gqa"


def gqa_attention(module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    b, h, s, d = query.shape
    kv = key.shape[1]
    g = h // kv
    t = key.shape[2]
    q = query.reshape(b, kv, g * s, d)
    scores = torch.matmul(q, key.transpose(2, 3)) * scaling  # [B, KV, G*S, T]
    if attention_mask is not None:  # [B, 1, S, T]: the same for every head
        scores = (scores.view(b, kv, g, s, t) + attention_mask[:, :, None]).view(b, kv, g * s, t)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # [B, KV, G*S, D]
    out = out.view(b, h, s, d).transpose(1, 2).contiguous()  # [B, S, H, D], as eager returns it
    return out, None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, gqa_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
