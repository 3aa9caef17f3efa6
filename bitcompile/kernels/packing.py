"""The canonical 2-bit packed layout of ternary weights (DESIGN.md §4), version 1.

Why this layout: the C kernels (``kernels/csrc``) unpack 64 codes with one shift and one
AND per 64-byte load, straight into the lanes that ``vpdpbusd`` (AVX-512 VNNI) or
``vpmaddubsw`` (AVX2) multiply with 64 *contiguous* int8 activations. Packing four
*adjacent* codes per byte defeats this (measured: inductor emits scalar code, and a SIMD
kernel needs a shuffle per load); a planar order within a block is what bitnet.cpp's I2_S
and llama.cpp's TQ2_0 use too (BitNet b1.58, arXiv:2402.17764; bitnet.cpp, arXiv:2410.16144).

Codes: a ternary weight ``q ∈ {-1, 0, 1}`` is stored as ``c = q + 1 ∈ {0, 1, 2}`` (2 bits;
``3`` never occurs). Each row of the ``(N, K)`` weight is padded along K with ``q = 0``
(``c = 1``) to ``Kp = ceil(K / 64) * 64`` (v1 padded to a multiple of 256: +33 % for
K = 576). The row is ``nb = Kp // 256`` full blocks of 256 codes followed by
``t = (Kp % 256) // 64`` (0..3) tail chunks of 64 codes. Full block ``b`` is the 64 bytes
at row offset ``64 * b``; byte ``j`` (0..63) holds four codes, 64 apart::

    byte j of block b:   bit 7 6 | 5 4 | 3 2 | 1 0
                             c[k3] |c[k2]|c[k1]|c[k0]      k_i = 256*b + 64*i + j

    block b (64 bytes):  byte  0      1      2     ...   63
         bits 1..0  ->   k=256b+0     +1     +2    ...   +63     "plane" i = 0
         bits 3..2  ->   k=256b+64    +65    +66   ...   +127    plane i = 1
         bits 5..4  ->   k=256b+128   ...                +191    plane i = 2
         bits 7..6  ->   k=256b+192   ...                +255    plane i = 3

Tail chunk ``c`` (0 <= c < t) is the 16 bytes at row offset ``64 * nb + 16 * c``, the same
planar order at a quarter of the width: byte ``j`` (0..15) holds codes 16 apart::

    k_i = 256*nb + 64*c + 16*i + j        (bits 2i..2i+1 of byte j, i = 0..3)

So ``(block >> 2*i) & 3`` yields codes for the 64 contiguous k of plane ``i``, and a tail
chunk's 16 bytes broadcast to four 16-byte lanes shifted by 0, 2, 4, 6 yield its 64
contiguous k (one variable shift in AVX2 / AVX-512). The packed tensor is uint8
``(N, Kp // 4)``; scales are separate (fp32 ``(N, n_groups)`` multipliers). Padding never
changes a result: a padded code is the zero weight, and the kernels never read
activations past ``K`` (they pad them with zeros internally).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Name and version written into saved metadata; bump the version on any change below.
LAYOUT_NAME = "bc_i2_planar256_t64"
LAYOUT_VERSION = 2

#: K values per full block and bytes per full block.
BLOCK_K = 256
BLOCK_BYTES = BLOCK_K // 4
#: K values per tail chunk (rows are padded to a multiple of this) and bytes per tail chunk.
PAD_K = 64
TAIL_BYTES = PAD_K // 4


def padded_in_features(in_features: int) -> int:
    """``K`` rounded up to a multiple of 64 (the packed row holds ``padded_in_features(K) // 4`` bytes)."""
    if in_features < 0:
        raise ValueError(f"in_features={in_features} must be >= 0")
    return -(-in_features // PAD_K) * PAD_K


def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the packed uint8 tensor for an ``(out_features, in_features)`` weight."""
    return out_features, padded_in_features(in_features) // 4


def pack_codes(codes: Tensor) -> Tensor:
    """Pack ternary weights ``q`` (int8 ``(N, K)`` in {-1, 0, 1}) into the v2 layout.

    Args:
        codes (Tensor[int8], N x K): ternary codes as :func:`reference.quantize_weight`
            returns them (``q``, not ``q + 1``).

    Returns:
        Tensor[uint8], N x padded_in_features(K) // 4, contiguous, on ``codes.device``.

    Example::

        >>> q = torch.tensor([[-1, 0, 1]], dtype=torch.int8)
        >>> unpack_codes(pack_codes(q), 3).tolist()
        [[-1, 0, 1]]
    """
    if not isinstance(codes, Tensor):
        raise TypeError(f"pack_codes: expected a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"pack_codes: codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"pack_codes: codes must be an integer tensor with values in {{-1, 0, 1}}, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
        bad = codes[(codes < -1) | (codes > 1)][0].item()
        raise ValueError(
            f"pack_codes: codes must be ternary in {{-1, 0, 1}} (found {bad}); "
            "quantize the weight first with kernels.reference.quantize_weight"
        )
    n, k = codes.shape
    kp = padded_in_features(k)
    c = torch.ones((n, kp), dtype=torch.uint8, device=codes.device)  # pad with c = 1 (q = 0)
    c[:, :k] = (codes.to(torch.int16) + 1).to(torch.uint8)
    nb, t = kp // BLOCK_K, (kp % BLOCK_K) // PAD_K
    full = c[:, : nb * BLOCK_K].reshape(n, nb, 4, BLOCK_BYTES)  # [row, block, plane i, byte j]
    tail = c[:, nb * BLOCK_K :].reshape(n, t, 4, TAIL_BYTES)  # [row, tail chunk, plane i, byte j]
    full, tail = (p[:, :, 0] | (p[:, :, 1] << 2) | (p[:, :, 2] << 4) | (p[:, :, 3] << 6) for p in (full, tail))
    return torch.cat([full.reshape(n, nb * BLOCK_BYTES), tail.reshape(n, t * TAIL_BYTES)], dim=1).contiguous()


def unpack_codes(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 ``(N, in_features)`` ternary codes in {-1, 0, 1}."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} tensor of shape {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed)
        raise TypeError(f"unpack_codes: packed must be a 2-D uint8 tensor (N, Kp/4), got {got}")
    kp = padded_in_features(in_features)
    n = packed.shape[0]
    if packed.shape[1] != kp // 4:
        raise ValueError(
            f"unpack_codes: packed has {packed.shape[1]} bytes per row but in_features={in_features} needs "
            f"{kp // 4} (layout {LAYOUT_NAME} v{LAYOUT_VERSION} pads K to a multiple of {PAD_K})"
        )
    nb, t = kp // BLOCK_K, (kp % BLOCK_K) // PAD_K
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    full = (packed[:, : nb * BLOCK_BYTES].reshape(n, nb, 1, BLOCK_BYTES) >> shifts) & 3
    tail = (packed[:, nb * BLOCK_BYTES :].reshape(n, t, 1, TAIL_BYTES) >> shifts) & 3
    c = torch.cat([full.reshape(n, nb * BLOCK_K), tail.reshape(n, t * PAD_K)], dim=1)
    if c.numel() and int(c.max()) > 2:
        raise ValueError(f"unpack_codes: found the invalid 2-bit code 3; the tensor is not {LAYOUT_NAME} v{LAYOUT_VERSION}")
    return (c[:, :in_features].to(torch.int8) - 1).contiguous()


def check_packed_args(
    where: str, x: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None
) -> None:
    """Validate the arguments every ``packed_*_matmul`` takes; raise ValueError/TypeError naming the problem."""
    from bitcompile.kernels.groups import check_group_code

    check_group_code(group_code)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise TypeError(f"{where}: packed must be a 2-D uint8 tensor ({LAYOUT_NAME} v{LAYOUT_VERSION}), got {got}")
    n = packed.shape[0]
    if packed.shape[1] != padded_in_features(in_features) // 4:
        raise ValueError(
            f"{where}: packed has {packed.shape[1]} bytes per row, in_features={in_features} needs "
            f"{padded_in_features(in_features) // 4} ({LAYOUT_NAME} v{LAYOUT_VERSION} pads K to a multiple of {PAD_K})"
        )
    check_operands(where, x, n, w_scales, in_features, group_code, bias)


def check_operands(
    where: str, x: Tensor, n: int, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None
) -> None:
    """Validate what a packed linear takes besides its packed bytes (shared by every packed layout)."""
    from bitcompile.kernels.groups import num_groups

    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"{where}: activations must be 2-D (M, {in_features}), got shape {tuple(x.shape)}")
    g = num_groups(in_features, group_code)
    if w_scales.dim() != 2 or tuple(w_scales.shape) != (n, g):
        raise ValueError(
            f"{where}: w_scales must have shape ({n}, {g}) for in_features={in_features} and group_size code "
            f"{group_code}, got {tuple(w_scales.shape)}"
        )
    if not w_scales.is_floating_point():
        raise TypeError(f"{where}: w_scales must be floating point (fp32 multipliers), got {w_scales.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias shape {tuple(bias.shape)} does not match out_features {n}")


def check_packed_int8_args(
    where: str, x_codes: Tensor, x_scales: Tensor, packed: Tensor, w_scales: Tensor, in_features: int,
    group_code: int, bias: Tensor | None,
) -> None:  # fmt: skip
    """:func:`check_packed_args` plus int8 activation codes with one scale per row."""
    check_packed_args(where, x_codes, packed, w_scales, in_features, group_code, bias)
    if x_codes.dtype != torch.int8:
        raise TypeError(f"{where}: x_codes must be int8 (quantize_activations output), got {x_codes.dtype}")
    if tuple(x_scales.shape) != (x_codes.shape[0],):
        raise ValueError(f"{where}: x_scales must have shape ({x_codes.shape[0]},), got {tuple(x_scales.shape)}")


def check_packed_float_args(
    where: str, x2d: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None
) -> None:
    """:func:`check_packed_args` plus floating-point activations."""
    check_packed_args(where, x2d, packed, w_scales, in_features, group_code, bias)
    if not x2d.is_floating_point():
        raise TypeError(f"{where}: x2d must be floating point, got {x2d.dtype}")
