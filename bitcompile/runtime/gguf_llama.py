"""The Llama architecture in GGUF: tensor names, the q/k row order, and the metadata keys.

What llama.cpp's ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``, in both directions:
Hugging Face module names ↔ GGUF tensor names (``model.layers.3.mlp.down_proj`` ↔
``blk.3.ffn_down``), and the row permutation of ``q_proj`` / ``k_proj`` (``LlamaModel.permute``:
llama.cpp's LLAMA rope rotates adjacent pairs, transformers rotates the two halves of each
head). A row permutation moves whole rows, so per-row and per-group scales move with their rows
and ternary codes stay exact.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = [
    "ARCH",
    "GgufFormatError",
    "config_from_metadata",
    "gguf_name",
    "hf_name",
    "metadata_from_config",
    "rope_permutation",
]

ARCH = "llama"

#: Hugging Face module name → GGUF tensor name (without ``.weight`` / ``.bias``).
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_PER_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_HF = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_GGUF = re.compile(r"^blk\.(\d+)\.(.+)$")


class GgufFormatError(ValueError):
    """A GGUF file (or a model to write as one) that this module cannot map; the message names the tensor."""


def gguf_name(module_name: str) -> str | None:
    """GGUF name of a Hugging Face Llama module (``None`` if it has none)."""
    if module_name in _GLOBAL:
        return _GLOBAL[module_name]
    match = _LAYER_HF.match(module_name)
    if match and match.group(2) in _PER_LAYER:
        return f"blk.{match.group(1)}.{_PER_LAYER[match.group(2)]}"
    return None


def hf_name(tensor_module: str) -> str | None:
    """Inverse of :func:`gguf_name` (``blk.0.attn_q`` → ``model.layers.0.self_attn.q_proj``)."""
    for hf, gg in _GLOBAL.items():
        if gg == tensor_module:
            return hf
    match = _LAYER_GGUF.match(tensor_module)
    if match:
        for hf, gg in _PER_LAYER.items():
            if gg == match.group(2):
                return f"model.layers.{match.group(1)}.{hf}"
    return None


def rope_permutation(module_name: str, out_features: int, config: Any) -> torch.Tensor | None:
    """Row order of a q/k projection in GGUF: ``gguf_rows = hf_rows[perm]`` (``None`` for other layers)."""
    if module_name.endswith("self_attn.q_proj"):
        heads = config.num_attention_heads
    elif module_name.endswith("self_attn.k_proj"):
        heads = config.num_key_value_heads
    else:
        return None
    if out_features % (2 * heads):
        raise GgufFormatError(f"layer {module_name!r}: out_features={out_features} is not 2 x heads ({heads}) x an integer")
    # convert_hf_to_gguf.LlamaModel.permute: reshape(heads, 2, dim/2).swapaxes(1, 2)
    return torch.arange(out_features).reshape(heads, 2, out_features // heads // 2).transpose(1, 2).reshape(-1)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise GgufFormatError(f"rope_type {rope_type!r} (rope scaling) is not written to GGUF by bitcompile; only default RoPE")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def metadata_from_config(config: Any) -> dict[str, Any]:
    """The ``llama.*`` keys llama.cpp reads, from a transformers ``LlamaConfig``."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "head_count": int(heads),
        "head_count_kv": int(config.num_key_value_heads or heads),
        "rope_dimension_count": int(head_dim),
        "key_length": int(head_dim),
        "value_length": int(head_dim),
        "rms_eps": float(config.rms_norm_eps),
        "rope_freq_base": _rope_theta(config),
        "vocab_size": int(config.vocab_size),
    }


def config_from_metadata(fields: dict[str, Any], tied: bool, vocab_size: int) -> Any:
    """A transformers ``LlamaConfig`` from a GGUF file's ``llama.*`` keys (``fields``: key → value)."""
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        if f"{ARCH}.{key}" not in fields:
            raise GgufFormatError(f"GGUF metadata has no {ARCH}.{key}; cannot build the Llama config")
        return fields[f"{ARCH}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(fields.get(f"{ARCH}.attention.key_length", hidden // heads))
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(fields.get(f"{ARCH}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(fields.get(f"{ARCH}.context_length", 2048)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(fields.get(f"{ARCH}.rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
    )
