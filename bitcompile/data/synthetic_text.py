"""English-like text from a small seeded grammar, and a character tokenizer.

The grammar gives the text structure a language model can learn in a few hundred steps
(words, agreement-free sentences, punctuation) while staying fully reproducible.
"""

from __future__ import annotations

import random

import torch

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher", "our team"]
_VERBS = ["sees", "likes", "builds", "finds", "carries", "paints", "follows", "remembers"]
_OBJECTS = ["the red ball", "a long road", "the blue house", "a quiet song", "the green tree", "an old map"]
_ENDINGS = ["today", "at night", "in the garden", "with care", "again", "near the river"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ENDINGS))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "!", "?"])


def make_text(num_chars: int = 20_000, seed: int = 0) -> str:
    """About ``num_chars`` characters of generated sentences (deterministic for a seed)."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < num_chars:
        parts.append(sentence(rng))
        length += len(parts[-1]) + 1
    return " ".join(parts)[:num_chars]


class CharTokenizer:
    """Characters ↔ ids over a fixed alphabet (the grammar's characters fit in 64)."""

    def __init__(self, text: str) -> None:
        self.alphabet = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.alphabet[i] for i in ids.tolist())


def random_batches(tokens: torch.Tensor, batch: int, seq: int, steps: int, seed: int = 0):
    """``steps`` (inputs, targets) pairs of shape ``(batch, seq)`` cut at random offsets."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]
