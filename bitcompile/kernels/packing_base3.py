"""The 1.6-bit packed layout of ternary weights: five weights per byte, base 3 (version 1).

Why: a decode GEMV reads every weight once from DRAM, so its time is bytes / bandwidth. The
canonical 2-bit layout (:mod:`bitcompile.kernels.packing`) spends 2 bits on a 3-valued weight;
five weights fit in one byte because ``3**5 = 243 <= 256``: 1.6 bits per weight, 20 % fewer
bytes (llama.cpp's TQ1_0 packs the same way; BitNet b1.58, arXiv:2402.17764).

Byte code: the five weights ``q_0..q_4 ∈ {-1, 0, 1}`` of one byte are one balanced-ternary
number ``V = q_0 + 3 q_1 + 9 q_2 + 27 q_3 + 81 q_4 ∈ [-121, 121]``, stored sign-magnitude::

    byte = 128 * (V < 0) + |V|          (|V| <= 121; bytes 122..128 and 250..255 never occur)

NOTE: why sign-magnitude and not llama.cpp's ``ceil(256 * v / 243)``: the sign of a
balanced-ternary number is the sign of its leading nonzero digit, so negating all five weights
only flips bit 7. The kernel decodes the low 7 bits with a 128-entry byte table (one AVX-512
VBMI ``vpermi2b``) into the 2-bit codes of weights 0..3 (and a second table into the code of
weight 4), and applies the sign with one masked subtract: ``2 - c`` for each 2-bit field of a
byte is ``0xAA - byte`` (no field borrows, since ``c <= 2``). TQ1_0's decode needs about
seven instructions per weight plane; this one about two.

Row order (planar, as in the 2-bit layout, so a decoded plane meets 64 contiguous int8
activations): each row of the ``(N, K)`` weight is padded along K with ``q = 0`` to
``Kp = ceil(K / 320) * 320`` and stored as ``Kp / 320`` blocks of 64 bytes; byte ``j``
(0..63) of block ``b`` holds the five weights ``k_i = 320 b + 64 i + j`` (``i = 0..4``)::

    block b (64 bytes):   byte  0        1        ...  63
        digit q_0   ->    k = 320b+0     +1       ...  +63      plane 0
        digit q_1   ->    k = 320b+64    +65      ...  +127     plane 1
        ...
        digit q_4   ->    k = 320b+256   +257     ...  +319     plane 4

The packed tensor is uint8 ``(N, Kp / 5)``; scales are separate, as in the 2-bit layout.
Bytes per weight: ``Kp / (5 K)`` (0.2031 at K = 4096, 0.2222 at K = 576 against 0.25).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Name and version written into saved metadata; bump the version on any change below.
LAYOUT_NAME = "bc_t5_signmag_planar320"
LAYOUT_VERSION = 1

#: weights per byte, K values per 64-byte block (rows are padded to a multiple of this)
TRITS_PER_BYTE = 5
BLOCK_K = 320
BLOCK_BYTES = 64
#: largest |V| of a byte (all five digits 1)
MAX_MAGNITUDE = 121

_POWERS = (1, 3, 9, 27, 81)


def padded_in_features(in_features: int) -> int:
    """``K`` rounded up to a multiple of 320 (the packed row holds ``padded_in_features(K) // 5`` bytes)."""
    if in_features < 0:
        raise ValueError(f"in_features={in_features} must be >= 0")
    return -(-in_features // BLOCK_K) * BLOCK_K


def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the packed uint8 tensor for an ``(out_features, in_features)`` weight."""
    return out_features, padded_in_features(in_features) // TRITS_PER_BYTE


def pack_codes(codes: Tensor) -> Tensor:
    """Pack ternary weights ``q`` (integer ``(N, K)`` in {-1, 0, 1}) into this layout.

    Returns:
        Tensor[uint8], N x padded_in_features(K) // 5, contiguous, on ``codes.device``.

    Example::

        >>> q = torch.tensor([[-1, 0, 1]], dtype=torch.int8)
        >>> unpack_codes(pack_codes(q), 3).tolist()
        [[-1, 0, 1]]
    """
    if not isinstance(codes, Tensor):
        raise TypeError(f"pack_codes (1.6-bit): expected a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"pack_codes (1.6-bit): codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"pack_codes (1.6-bit): codes must be an integer tensor with values in {{-1, 0, 1}}, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
        bad = codes[(codes < -1) | (codes > 1)][0].item()
        raise ValueError(
            f"pack_codes (1.6-bit): codes must be ternary in {{-1, 0, 1}} (found {bad}); "
            "quantize the weight first with kernels.reference.quantize_weight"
        )
    n, k = codes.shape
    kp = padded_in_features(k)
    q = torch.zeros((n, kp), dtype=torch.int16, device=codes.device)  # pad with q = 0
    q[:, :k] = codes.to(torch.int16)
    planes = q.reshape(n, kp // BLOCK_K, TRITS_PER_BYTE, BLOCK_BYTES)  # [row, block, digit i, byte j]
    powers = torch.tensor(_POWERS, dtype=torch.int16, device=codes.device).view(1, 1, TRITS_PER_BYTE, 1)
    value = (planes * powers).sum(dim=2)  # V in [-121, 121]
    byte = torch.where(value < 0, 128 - value, value)  # 128 + |V| for negative V
    return byte.reshape(n, kp // TRITS_PER_BYTE).to(torch.uint8).contiguous()


def invalid_bytes(packed: Tensor) -> Tensor:
    """Bool mask of bytes that :func:`pack_codes` never writes (|V| > 121, or a negative zero)."""
    return ((packed & 127) > MAX_MAGNITUDE) | (packed == 128)


def unpack_codes(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 ``(N, in_features)`` ternary codes in {-1, 0, 1}."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} tensor of shape {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed)
        raise TypeError(f"unpack_codes (1.6-bit): packed must be a 2-D uint8 tensor (N, Kp/5), got {got}")
    kp = padded_in_features(in_features)
    n = packed.shape[0]
    if packed.shape[1] != kp // TRITS_PER_BYTE:
        raise ValueError(
            f"unpack_codes (1.6-bit): packed has {packed.shape[1]} bytes per row but in_features={in_features} needs "
            f"{kp // TRITS_PER_BYTE} (layout {LAYOUT_NAME} v{LAYOUT_VERSION} pads K to a multiple of {BLOCK_K})"
        )
    if packed.numel() and bool(invalid_bytes(packed).any()):
        bad = int(packed[invalid_bytes(packed)][0])
        raise ValueError(f"unpack_codes (1.6-bit): byte {bad} is not a code of {LAYOUT_NAME} v{LAYOUT_VERSION}")
    b = packed.to(torch.int16)
    magnitude = b & 127
    sign = 1 - 2 * (b >> 7)  # +1, or -1 when bit 7 is set
    digits = []
    rest = magnitude
    for _ in range(TRITS_PER_BYTE):  # balanced-ternary digits of |V|, least significant first
        d = torch.remainder(rest + 1, 3) - 1
        digits.append(d)
        rest = (rest - d) // 3
    q = torch.stack(digits, dim=1) * sign.unsqueeze(1)  # [row, digit i, block * 64 + byte j]
    q = q.reshape(n, TRITS_PER_BYTE, kp // BLOCK_K, BLOCK_BYTES).transpose(1, 2).reshape(n, kp)
    return q[:, :in_features].to(torch.int8).contiguous()
