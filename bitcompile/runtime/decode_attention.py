"""Decode attention for compiled serving: one query token over a KV cache, grouped-query heads
reading their shared KV head in place (``torch.ops.bitcpm_native.decode_attention``).

Why: with a static KV cache transformers passes SDPA a mask, and with a mask it expands every
KV head to its query heads (``repeat_kv``) before calling SDPA. In a compiled decode step that
copies the whole cache once per layer and token: for SmolLM2-135M (3 KV heads, 9 query heads,
30 layers) ~3x the cache in copies, more bytes than the ternary weights. The C++ op reads each
KV head once and skips the masked (not yet written) positions.

It is plugged in through transformers' own extension point: an attention function registered
in ``AttentionInterface`` (with SDPA's mask function in ``AttentionMaskInterface``) under
:data:`ATTENTION_NAME`, set on the model by :func:`install`. Anything it does not cover (more
than one query token, non-fp32, dropout, soft-capping, attention sinks, position biases) goes
to transformers' SDPA function unchanged. Numerics: fp32 like SDPA's CPU kernels, another
summation order (agrees with SDPA to ~1e-6 relative).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ATTENTION_NAME", "decode_attention_forward", "install", "register"]

ATTENTION_NAME = "bitcpm_decode"
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")


def _covered(query: Tensor, key: Tensor, attention_mask: Tensor | None, dropout: float, kwargs: dict) -> bool:
    return (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype == key.dtype == torch.float32
        and dropout == 0.0
        and (attention_mask is None or attention_mask.dtype in (torch.bool, torch.float32))
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in _UNSUPPORTED_KWARGS)
    )


def decode_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """A transformers attention function (the ``AttentionInterface`` signature): the C++ decode
    op for one fp32 query token, transformers' SDPA function for everything else.

    Args:
        module: the attention module (passed on to SDPA).
        query: ``(batch, heads, q_len, head_dim)``.
        key, value: ``(batch, kv_heads, kv_len, head_dim)``, not repeated per query head.
        attention_mask: SDPA's mask (bool, True = attend) or None.
        dropout, scaling, is_causal, kwargs: as transformers passes them to SDPA.

    Returns:
        ``(attn_output (batch, q_len, heads, head_dim), None)``.
    """
    if _covered(query, key, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.ops.bitcpm_native.decode_attention(query, key, value, attention_mask, scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Register :data:`ATTENTION_NAME` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, decode_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install(model: nn.Module) -> tuple[str | None, str]:
    """Switch a transformers model from SDPA to :data:`ATTENTION_NAME`.

    Returns:
        ``(previous implementation, why)``: the previous one is None where nothing was switched,
        and ``why`` says what happened (a model on ``eager`` or flash attention keeps it: its
        attention may soft-cap or differ from SDPA in ways this op does not reproduce).
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return None, f"already {ATTENTION_NAME}"
    if current != "sdpa":
        return None, f"kept {current!r} attention (only a model on 'sdpa' is switched to the decode op)"
    set_impl = getattr(model, "set_attn_implementation", None)
    if set_impl is None:
        return None, "kept 'sdpa': the model cannot change its attention implementation"
    register()
    set_impl(ATTENTION_NAME)
    if config._attn_implementation != ATTENTION_NAME:
        return None, f"kept {config._attn_implementation!r}: transformers did not switch this model's attention"
    return current, f"decode steps use bitcpm_native::decode_attention ({ATTENTION_NAME}); longer inputs keep SDPA"
