"""A Hugging Face Llama as one decoder step with an explicit KV cache, the graph onnxruntime-genai runs.

:class:`LlamaWithKVCache` computes ``(input_ids, attention_mask, position_ids, past) →
(logits, present)`` with the model's own modules (embeddings, RMSNorms, rotary embedding,
projections, MLP, head: packed ternary or not), and writes attention out in plain tensor
ops so that ``torch.onnx.export`` gives a graph with the cache as inputs and outputs:

* ``past_key_values.{i}.key / .value``: ``(batch, kv_heads, past_sequence_length, head_dim)``;
* ``present.{i}.key / .value``: ``(batch, kv_heads, past_sequence_length + sequence_length,
  head_dim)``, the past with this step's keys and values appended;
* ``attention_mask``: ``(batch, past_sequence_length + sequence_length)``, 1 for real tokens.

The attention is the eager attention of transformers' Llama (scaled ``q @ kᵀ``, causal +
padding mask, fp32 softmax, grouped-query heads repeated), so the graph computes what the
packed PyTorch model computes; only the ternary layers' int8 compute differs (docs/onnx.md).
"""

from __future__ import annotations

import torch
from torch import nn

from bitcompile.export.results import OnnxExportError

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaWithKVCache", "cache_input_names", "cache_output_names"]

#: ``config.model_type`` values whose decoder layers this module runs as transformers does.
SUPPORTED_MODEL_TYPES = ("llama",)


def cache_input_names(num_layers: int) -> list[str]:
    """``past_key_values.0.key, past_key_values.0.value, ...`` (onnxruntime-genai's names)."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def cache_output_names(num_layers: int) -> list[str]:
    """``present.0.key, present.0.value, ...`` (onnxruntime-genai's names)."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, kv_heads, s, d) → (b, kv_heads * groups, s, d)``: each KV head serves ``groups`` query heads."""
    if groups == 1:
        return x
    b, heads, s, d = x.shape
    return x[:, :, None].expand(b, heads, groups, s, d).reshape(b, heads * groups, s, d)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaWithKVCache(nn.Module):
    """One decoder step of a transformers ``LlamaForCausalLM`` with the KV cache as tensors.

    Holds the model's ``model`` (decoder) and ``lm_head`` under the same names, so layer
    paths (``model.layers.0.self_attn.q_proj``) stay the Hugging Face ones. The model is not
    copied or changed.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise OnnxExportError(
                f"export_genai: model_type {model_type!r} is not supported: the KV-cache decoder is written for "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (transformers *ForCausalLM)"
            )
        for name in ("model", "lm_head"):
            if not isinstance(getattr(model, name, None), nn.Module):
                raise OnnxExportError(f"export_genai: a {model_type} causal LM needs a .{name} module; {type(model).__name__} has none")
        self.model = model.model
        self.lm_head = model.lm_head
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        """Logits ``(batch, seq, vocab)`` then ``present.0.key, present.0.value, ...``."""
        batch, seq = input_ids.shape
        past_len = past_key_values[0].shape[2]
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        # Query i (absolute position past_len + i) sees key j when j <= past_len + i and the
        # mask marks j as a real token; other scores get the lowest float, as transformers does.
        key_positions = torch.arange(past_len + seq, device=input_ids.device)
        query_positions = torch.arange(seq, device=input_ids.device) + past_len
        allowed = (key_positions[None, :] <= query_positions[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        presents: list[torch.Tensor] = []
        for index, layer in enumerate(self.model.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attention.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = attention.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = attention.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat([past_key_values[2 * index], k], dim=2)
            v = torch.cat([past_key_values[2 * index + 1], v], dim=2)
            presents += [k, v]
            groups = self.num_heads // self.num_kv_heads
            scores = torch.matmul(q, _repeat_kv(k, groups).transpose(2, 3)) * attention.scaling + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, _repeat_kv(v, groups)).transpose(1, 2).reshape(batch, seq, -1)
            hidden = hidden + attention.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.lm_head(self.model.norm(hidden))
        return (logits, *presents)
