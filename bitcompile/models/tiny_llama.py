"""A tiny Llama-style decoder: RMSNorm, rotary attention, SwiGLU MLP, tied embeddings.

Small enough to train for a few hundred steps on two CPU cores, and shaped like the real
thing so the compiler meets the same graph patterns (q/k/v/o and gate/up/down
projections, an lm_head that shares the embedding matrix).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far (``(batch, heads, seq, head_dim)``)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        size = config.hidden_size
        self.q_proj = nn.Linear(size, size, bias=False)
        self.k_proj = nn.Linear(size, size, bias=False)
        self.v_proj = nn.Linear(size, size, bias=False)
        self.o_proj = nn.Linear(size, size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        batch, seq, size = x.shape
        # -1 heads: under tensor parallelism (q/k/v column-parallel) each rank holds num_heads / tp of them
        shape = (batch, seq, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        past = 0
        if cache is not None:
            if cache.keys[layer] is not None:
                past = cache.keys[layer].shape[2]
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries see every cached position and the causal part of their own chunk
            allowed = torch.arange(past + seq)[None, :] <= torch.arange(past, past + seq)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_norm(x))


class TinyLlama(nn.Module):
    """``TinyLlama(TinyLlamaConfig())(tokens) -> logits`` with tokens ``(batch, seq)``."""

    def __init__(self, config: TinyLlamaConfig = TinyLlamaConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        head_dim = config.hidden_size // config.num_heads
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.max_seq_len).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``; with ``cache`` the tokens continue the cached ones."""
        start = cache.length if cache is not None else 0
        positions = slice(start, start + tokens.shape[1])
        x = self.embed_tokens(tokens)  # its dtype, not its weight's: a packed embedding has no float weight
        cos, sin = self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, index)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def greedy_generate_cached(model: TinyLlama, tokens: torch.Tensor, new_tokens: int, forward=None) -> torch.Tensor:
    """Greedy decoding with a KV cache: one prefill over the prompt, then one token per step.

    ``forward`` (default ``model``) may be a compiled version of the model.
    """
    forward = model if forward is None else forward
    cache = KVCache.empty(len(model.layers))
    logits = forward(tokens, cache)
    for _ in range(new_tokens):
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        if tokens.shape[1] > model.config.max_seq_len:
            raise ValueError(f"generation reached max_seq_len={model.config.max_seq_len}")
        logits = forward(next_token, cache)
    return tokens


@torch.no_grad()
def greedy_generate(forward, tokens: torch.Tensor, new_tokens: int, window: int | None = None) -> torch.Tensor:
    """Greedy decoding without a KV cache through any forward callable (eager or compiled).

    With ``window`` the model always sees the last ``window`` tokens, so a compiled model
    meets one input shape instead of recompiling for every length.
    """
    for _ in range(new_tokens):
        context = tokens if window is None else tokens[:, -window:]
        next_token = forward(context)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens
