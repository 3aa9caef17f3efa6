"""Small models the demo, examples and tests train: they ship so `bitcompile demo` needs no download."""

from bitcompile.models.mlp import MLP
from bitcompile.models.tiny_llama import TinyLlama, TinyLlamaConfig, greedy_generate, greedy_generate_cached

__all__ = ["MLP", "TinyLlama", "TinyLlamaConfig", "greedy_generate", "greedy_generate_cached"]
