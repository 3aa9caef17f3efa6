"""Pack a tiny Llama, export it to ONNX, and generate with onnxruntime (no PyTorch at inference).

    pip install -e '.[onnx]'
    python examples/export_onnx.py [--format qdq] [--out tiny_llama.onnx]

The exported graph takes ``tokens (batch, seq)`` and returns ``logits (batch, seq, vocab)``;
it has no KV-cache inputs, so the generation loop below feeds the whole sequence at every
step (simple, and exact to compare with PyTorch's ``greedy_generate``). For a model you
trained with ``torch.compile(model, backend="bitcpm")``, pass the same ``TernaryConfig``
to ``bitcompile.pack`` (or as ``config=`` to ``export_onnx``) before exporting.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import torch

import bitcompile
from bitcompile.models import TinyLlama, TinyLlamaConfig
from bitcompile.models.tiny_llama import greedy_generate


def generate_onnx(session: ort.InferenceSession, tokens: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding through onnxruntime: one full forward per new token."""
    name = session.get_inputs()[0].name
    for _ in range(new_tokens):
        logits = session.run(None, {name: tokens})[0]
        tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("matmulnbits", "qdq"), default="matmulnbits")
    parser.add_argument("--out", default="tiny_llama.onnx")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig()).eval()  # untrained here; use your trained model
    packed = bitcompile.pack(model)  # 2-bit weights; the tied lm_head stays float
    example = (torch.randint(0, model.config.vocab_size, (1, 8)),)
    result = bitcompile.export_onnx(packed, example, args.out, format=args.format, overwrite=True)
    print(result.summary())

    session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    onnx_tokens = generate_onnx(session, prompt.numpy(), new_tokens=10)
    torch_tokens = greedy_generate(packed, prompt, 10).numpy()
    print("onnxruntime:", onnx_tokens.tolist())
    print("PyTorch:    ", torch_tokens.tolist())
    print("same tokens:", bool((onnx_tokens == torch_tokens).all()))


if __name__ == "__main__":
    main()
