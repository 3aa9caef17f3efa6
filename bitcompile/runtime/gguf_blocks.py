"""GGUF block codecs for ternary weights: codes in {-1, 0, 1} and one fp16 scale per block.

Each encoder takes int8 codes ``(N, K)`` and fp16 block scales ``(N, K // block)`` and
returns the uint8 bytes ``(N, K // block * block_bytes)`` of ggml's block type; each decoder
is its exact inverse (codes and the fp16 scales, never a float weight). The layouts are
llama.cpp's ``ggml-common.h`` / ``ggml-quants.c`` (also the ``gguf`` package's ``quants.py``,
which the tests use as the independent reference):

- ``TQ2_0`` (256 weights, 66 bytes): ``qs[64]`` then ``d``. Byte ``32*m + j`` holds the codes
  ``c = q + 1`` of ``k = 128*m + 32*l + j`` in bits ``2l..2l+1`` (l = 0..3).
- ``TQ1_0`` (256 weights, 54 bytes): ``qs[48]``, ``qh[4]``, ``d``; five (or four, in ``qh``)
  base-3 digits per byte, stored as ``ceil(value * 256 / 243)`` so a digit is read with a
  multiply and a shift.
- ``Q4_0`` (32 weights, 18 bytes): ``d`` then ``qs[16]``; ``w = (nibble - 8) * d``, byte ``j``
  holds ``k = j`` (low nibble) and ``k = j + 16`` (high nibble). Codes 7, 8, 9 are exactly
  ``-d, 0, +d``: the smallest exact ternary encoding with 32-wide blocks.
- ``Q8_0`` (32 weights, 34 bytes): ``d`` then 32 int8 ``q``; ``w = q * d``.

The only rounding anywhere is the scale's: GGUF stores ``d`` as fp16.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "BLOCK_BYTES", "TERNARY_TYPES", "decode", "encode"]

#: Weights per block and bytes per block of each supported type (ggml's GGML_QUANT_SIZES).
BLOCK = {"TQ2_0": 256, "TQ1_0": 256, "Q4_0": 32, "Q8_0": 32}
BLOCK_BYTES = {"TQ2_0": 66, "TQ1_0": 54, "Q4_0": 18, "Q8_0": 34}
#: Types whose every value is a ternary code (a Q4_0 / Q8_0 tensor may hold any integer).
TERNARY_TYPES = ("TQ2_0", "TQ1_0")

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _blocks(codes: np.ndarray, scales: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    n, k = codes.shape
    block = BLOCK[kind]
    if k % block:
        raise ValueError(f"{kind}: in_features={k} is not a multiple of its block size {block}")
    if scales.shape != (n, k // block):
        raise ValueError(f"{kind}: expected {(n, k // block)} block scales, got {scales.shape}")
    c = codes.astype(np.int8).reshape(n * (k // block), block)
    d = scales.astype(np.float16).reshape(-1, 1).view(np.uint8)  # (blocks, 2) little-endian fp16
    return c, d, n, k


def encode(codes: np.ndarray, scales: np.ndarray, kind: str) -> np.ndarray:
    """Bytes ``(N, K // block * block_bytes)`` of ``kind`` for ternary ``codes`` with fp16 block ``scales``."""
    c, d, n, k = _blocks(codes, scales, kind)
    if kind == "TQ2_0":
        u = (c + 1).astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, m, l, j]
        qs = u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)
        out = np.concatenate([qs.reshape(-1, 64), d], axis=1)
    elif kind == "TQ1_0":
        u = (c + 1).astype(np.uint16)
        qs0 = (u[:, :160].reshape(-1, 5, 32) * _POW3[::-1].reshape(1, 5, 1)).sum(1)  # 32 bytes, 5 digits each
        qs1 = (u[:, 160:240].reshape(-1, 5, 16) * _POW3[::-1].reshape(1, 5, 1)).sum(1)  # 16 bytes
        qh = (u[:, 240:].reshape(-1, 4, 4) * _POW3[1:][::-1].reshape(1, 4, 1)).sum(1)  # 4 bytes, 4 digits (81..3)
        q = np.concatenate([qs0, qs1, qh], axis=1)
        q = ((q * 256 + 242) // 243).astype(np.uint8)  # ceil(q * 256 / 243)
        out = np.concatenate([q, d], axis=1)
    elif kind == "Q4_0":
        u = (c + 8).astype(np.uint8)
        out = np.concatenate([d, u[:, :16] | (u[:, 16:] << 4)], axis=1)
    elif kind == "Q8_0":
        out = np.concatenate([d, c.view(np.uint8)], axis=1)
    else:
        raise ValueError(f"unsupported GGUF block type {kind!r}; expected one of {', '.join(BLOCK)}")
    return np.ascontiguousarray(out.reshape(n, -1))


def decode(data: np.ndarray, kind: str, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8 (N, K), scales fp16 (N, K // block))`` from the bytes of a ``kind`` tensor.

    ``Q4_0`` / ``Q8_0`` values are returned as they are (they need not be ternary; the caller
    checks). Raises ValueError on a row length that does not match ``in_features``.
    """
    block, nbytes = BLOCK[kind], BLOCK_BYTES[kind]
    if in_features % block:
        raise ValueError(f"{kind}: in_features={in_features} is not a multiple of its block size {block}")
    blocks_per_row = in_features // block
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, blocks_per_row * nbytes)
    n = raw.shape[0]
    b = raw.reshape(-1, nbytes)
    if kind == "TQ2_0":
        qs, d = b[:, :64], b[:, 64:]
        c = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        codes = c.reshape(-1, 256).astype(np.int8) - 1
    elif kind == "TQ1_0":
        qs0, qs1, qh, d = b[:, :32], b[:, 32:48], b[:, 48:52], b[:, 52:]
        digits = []
        for part, width, count in ((qs0, 32, 5), (qs1, 16, 5), (qh, 4, 4)):
            shifted = part.reshape(-1, 1, width) * _POW3[:count].reshape(1, count, 1)  # uint8: wraps mod 256
            digits.append(((shifted.astype(np.uint16) * 3) >> 8).reshape(-1, count * width))
        codes = np.concatenate(digits, axis=1).astype(np.int8) - 1
    elif kind == "Q4_0":
        d, qs = b[:, :2], b[:, 2:]
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int8) - 8
    elif kind == "Q8_0":
        d, qs = b[:, :2], b[:, 2:]
        codes = qs.view(np.int8).copy()
    else:
        raise ValueError(f"unsupported GGUF block type {kind!r}; expected one of {', '.join(BLOCK)}")
    scales = np.ascontiguousarray(d).view(np.float16).reshape(n, blocks_per_row)
    return codes.reshape(n, in_features), scales
