"""Grouped-query attention for the extraction's decode steps without copying the KV cache.

transformers 5.19 (the version vLLM pins) repeats the KV cache n_rep times in every layer of every
decode step of a grouped-query model (`repeat_kv`); 5.24 packs the query heads instead (`pack_gqa`).
`packed_gqa_attention(model)` registers the packed form for the length of a `with` block when the
installed transformers lacks it, so `offline.generation`'s decode loop reads the cache as it is
(bit-identical results; throughput in docs/pipeline.md). Only the extraction
uses it: a server runs its engine's own attention.

    with packed_gqa_attention(model):
        model(input_ids=next_tokens[:, None], ...)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PACKED_GQA = "sdpa_packed_gqa"  # our registered attention: SDPA that never copies the KV cache to decode


def _sdpa_packed_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA for a decode step of a grouped-query model without `repeat_kv`: the query heads that share a
    KV head become that head's query rows, so the KV cache is read as it is instead of being copied
    n_rep times every layer of every step (transformers >= 5.24 does the same, `pack_gqa`; 5.19, which
    vLLM pins, repeats the cache, ~5x slower extraction at batch 64). Other shapes: plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep == 1 or query.shape[2] != 1 or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // n_rep, n_rep, dim)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def packed_gqa_attention(model: nn.Module):
    """Context manager: the model decodes with `_sdpa_packed_gqa` when it uses SDPA and this
    transformers repeats the KV cache for grouped-query decoding; otherwise it changes nothing."""
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    @contextlib.contextmanager
    def switched():
        previous = getattr(model.config, "_attn_implementation", None)
        if previous != "sdpa" or hasattr(sdpa_attention, "pack_gqa"):
            yield
            return
        AttentionInterface.register(PACKED_GQA, _sdpa_packed_gqa)
        AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)
        model.set_attn_implementation(PACKED_GQA)
        try:
            yield
        finally:
            model.set_attn_implementation(previous)

    return switched()
