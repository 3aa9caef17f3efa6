"""The C passes between the GEMMs (csrc/bc_passes.c, csrc/bc_dispatch.c): scaling, activation and
weight quantization, 2-bit packing; each is bit-identical with the torch expression it replaces."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.cpu import library
from bitcompile.kernels.cpu.library import EwArgs, PrepArgs, on_cpu, ptr, threads
from bitcompile.kernels.groups import EPS, PER_TENSOR, check_group_code


def out_buffer(m: int, n: int, out_dtype: torch.dtype) -> tuple[Tensor, int]:
    """An uninitialized ``(m, n)`` output of ``out_dtype`` (bf16, else fp32) and its C ``out_bf16`` flag."""
    if out_dtype == torch.bfloat16:
        return torch.empty((m, n), dtype=torch.bfloat16), 1
    return torch.empty((m, n), dtype=torch.float32), 0


def prepare_activations(
    x: Tensor, kind: int, k: int, kp: int, isa_id: int, unit_chunks: int | None, colscale: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    """Quantize (fp32/bf16 x, ``kind`` 0/1, times ``colscale`` per column if given) or copy (int8
    x, ``kind`` 2) into a zero-padded (M, kp) int8 buffer, with corr sums; returns
    ``(codes, scales or None, corr or None, n_units)``."""
    m = x.shape[0]
    xq = torch.empty((m, kp), dtype=torch.int8)
    sx = torch.empty((m,), dtype=torch.float32) if kind != 2 else None
    corr, n_units = None, 0
    if unit_chunks is not None:
        n_units = -(-(kp // 64) // unit_chunks)
        corr = torch.empty((m, n_units * 16), dtype=torch.int32)
    a = PrepArgs(
        m, k, kp, ptr(x), x.stride(0) if m else k, kind, ptr(xq), ptr(sx), ptr(corr), unit_chunks or 1, n_units,
        ptr(colscale),
    )  # fmt: skip
    library.LIB.bc_prep_i8(ctypes.byref(a), isa_id, threads())
    return xq, sx, corr, n_units


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm(a, b)``: exact int32 ``(M, K) @ (K, N)`` of int8 matrices (oneDNN VNNI).

    NOTE: torch 2.13's CPU ``_int_mm`` returns garbage when K = 1 and N > 1 (checked over
    M, N up to 67, K up to 65: K = 1 is the only failing case, contiguous or transposed ``b``);
    that case is a broadcast product.
    """
    if a.shape[1] == 1:
        return a.to(torch.int32) * b.to(torch.int32)
    return torch._int_mm(a, b)


# bc_ew ops (csrc/bc_passes.c) and the input dtypes it reads
EW_SCALE, EW_TERNARY, EW_UNPACK = 0, 1, 2
_EW_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.int32: 3}


def fp32_vector(t: Tensor | None, length: int, what: str) -> Tensor | None:
    """``t`` as a contiguous fp32 vector of exactly ``length`` values (the C code reads that many)."""
    if t is None:
        return None
    if t.numel() != length or sum(d != 1 for d in t.shape) > 1:
        raise ValueError(f"{what} must hold {length} values (one per {'row' if what == 'row' else 'column'}), got shape {tuple(t.shape)}")
    return t.float().contiguous().reshape(-1)


def elementwise(op: int, x: Tensor, out: Tensor, row=None, col=None, scalar: float = 1.0, bias=None) -> Tensor:
    """One C pass (csrc/bc_passes.c) over the rows of 2-D ``x`` into the rows of 2-D ``out``
    (same shape, except for the 2-bit decode: packed rows in, ``(rows, K)`` int8 out)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = out.shape
    kind = 0 if op == EW_UNPACK else _EW_KINDS[x.dtype]
    row, col, bias = fp32_vector(row, m, "row"), fp32_vector(col, n, "col"), fp32_vector(bias, n, "bias")
    if m and n:
        a = EwArgs(
            op, m, n, ptr(x), x.stride(0), kind, ptr(col), ptr(row), scalar, ptr(bias),
            ptr(out), out.stride(0), int(out.dtype == torch.bfloat16),
        )  # fmt: skip
        library.LIB.bc_ew(ctypes.byref(a), library.isa_id(), threads())
    return out


def scale_rows(
    x: Tensor,
    row: Tensor | None = None,
    col: Tensor | None = None,
    scalar: float = 1.0,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(((x.float() * col) * row[:, None]) * scalar + bias).to(out_dtype)`` in one pass.

    ``x`` is 2-D fp32, bf16, int8 or int32; ``row`` ``(M,)``, ``col`` and ``bias`` ``(N,)``
    (fp32 values; each may be None). Bit-identical with that torch expression: the same IEEE
    fp32 products in the same order, int32 -> fp32 and fp32 -> bf16 to nearest even (a NaN
    stays a NaN; its payload bits may differ from torch's, which differ between torch's own
    scalar and vector paths). A factor of the wrong length raises ValueError.
    """
    if x.dim() != 2:
        raise ValueError(f"scale_rows: x must be 2-D, got shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=out_dtype)
    if library.handle() is None or x.dtype not in _EW_KINDS or out_dtype not in (torch.float32, torch.bfloat16):
        m, n = x.shape
        row, col, bias = fp32_vector(row, m, "row"), fp32_vector(col, n, "col"), fp32_vector(bias, n, "bias")
        y = x.float()
        for factor in (col, None if row is None else row[:, None]):
            if factor is not None:
                y = y * factor.float()
        y = y * scalar if scalar != 1.0 else y
        return out.copy_(y + bias.float() if bias is not None else y)
    return elementwise(EW_SCALE, x, out, row=row, col=col, scalar=scalar, bias=bias)


def quantize_activations(x2d: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8 (bit-exact with :func:`reference.quantize_activations`), one fused C pass.

    With ``col_scale`` ``(K,)`` it quantizes ``x2d.float() * col_scale`` without forming that
    product matrix (the int8 grad_input folds the weight's per-row scales in this way).
    """
    col_scale = fp32_vector(col_scale, x2d.shape[-1], "col")
    lib = library.handle()
    if lib is None or x2d.dim() != 2 or x2d.shape[1] == 0 or x2d.dtype not in (torch.float32, torch.bfloat16) or x2d.requires_grad:
        return reference.quantize_activations(x2d if col_scale is None else x2d.float() * col_scale)
    x = x2d.contiguous()
    kind = 0 if x.dtype == torch.float32 else 1
    xq, sx, _, _ = prepare_activations(x, kind, x.shape[1], x.shape[1], library.isa_id(), None, col_scale)
    return xq, sx


def quantize_weight(weight: Tensor, group_code: int) -> tuple[Tensor, Tensor]:
    """:func:`reference.quantize_weight`, bit-identical: the scales by the same torch
    reductions, the codes ``clamp(round(w / s), -1, 1)`` in one C pass (csrc/bc_passes.c)
    instead of four fp32 ``(N, K)`` passes; it runs on every training step."""
    if group_code > 0 or weight.dim() != 2 or weight.numel() == 0 or not on_cpu(weight) or library.handle() is None:
        return reference.quantize_weight(weight, group_code)
    check_group_code(group_code)
    w = weight.detach().float()
    n = w.shape[0]
    absw = torch.abs(w)
    if group_code == PER_TENSOR:
        scales = absw.mean().clamp_min(EPS).expand(n, 1).contiguous()
    else:
        scales = absw.mean(dim=1, keepdim=True).clamp_min(EPS)
    del absw
    return elementwise(EW_TERNARY, w, torch.empty(w.shape, dtype=torch.int8), row=scales), scales


def pack_codes(codes: Tensor) -> Tensor:
    """:func:`packing.pack_codes` in C (same bytes), multi-threaded; for packing on every training step."""
    from bitcompile.kernels import packing

    if library.handle() is None or codes.dim() != 2 or codes.dtype != torch.int8 or not on_cpu(codes):
        return packing.pack_codes(codes)
    q = codes if codes.stride(-1) == 1 else codes.contiguous()
    n, k = q.shape
    out = torch.empty(packing.packed_shape(n, k), dtype=torch.uint8)
    if n and library.LIB.bc_pack_i2(ptr(q), q.stride(0) if n else k, n, k, ptr(out), threads()) != 0:
        return packing.pack_codes(codes)  # raises the ValueError naming the bad code
    return out

