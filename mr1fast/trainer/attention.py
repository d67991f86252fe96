"""The language model's attention function, registered with transformers' attention registry.

transformers calls one attention function per layer, chosen by the config's attention
implementation name; its AttentionInterface lets a library register its own under a new name
(public, documented: "Attention Interface"). mr1fast registers "mr1fast" and loads the language
model with it (the vision tower keeps its own implementation). The function looks at the mask
the forward was given (packing.attention_inputs prepares it) and runs:
- a FlexAttention BlockMask: torch's flex_attention (compiled on CUDA), the shared-prefix mask
  without a [T, T] tensor;
- no mask and cu_seq_lens_q: flash-attn's varlen kernel (plain packing; CUDA with flash-attn);
- anything else (a boolean or additive mask, none): transformers' own SDPA function, which is
  also what the padded forward, generate and evaluation run.
The mask function registered beside it is SDPA's, so generate prepares the masks it always did.
"""
from __future__ import annotations

import functools

import torch

NAME = "mr1fast"


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Register the attention function (and its mask function) once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex(query, key, value, block_mask, scaling):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]. Compiled on CUDA (the
    eager path materializes the scores: tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if query.is_cuda else flex_attention
    gqa = query.shape[1] != key.shape[1]
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def varlen(query, key, value, cu_seqlens, max_seqlen, scaling):
    """flash-attn's causal varlen attention over the sequences cu_seqlens bounds; query
    [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 dropout_p=0.0, softmax_scale=scaling, causal=True)
    return out[None]


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for each attention layer of the language model."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, BlockMask):
        return flex(query, key, value, attention_mask, scaling), None
    cu = kwargs.get("cu_seq_lens_q")
    if attention_mask is None and cu is not None:
        return varlen(query, key, value, cu, kwargs["max_length_q"], scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)


@functools.lru_cache(maxsize=None)
def has_flash_attn() -> bool:
    """flash-attn is importable (the padded layout's flash_attention_2, the varlen backend)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True

