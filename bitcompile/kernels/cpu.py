"""Fast ternary CPU kernels: C (AVX-512 VNNI / AVX2 / portable), same interface as ``reference``.

Why: ternary weights only pay off when a kernel reads 2 bits per weight and multiplies
them as integers (BitNet b1.58, arXiv:2402.17764; bitnet.cpp, arXiv:2410.16144). The C
code in ``csrc/`` is compiled by the package's own build (setup.py, no PyTorch headers)
into ``_bitcpm_cpu*.so`` and loaded with ctypes. Without it (no compiler at install time,
another OS) every function here falls back to :mod:`reference` and :func:`available`
returns False; a warning says so once.

The ISA is chosen at run time from cpuid (``avx512`` = AVX-512 F/BW/VL/DQ + VNNI, then
``avx2``, then ``scalar``); ``BITCOMPILE_ISA=avx512|avx2|scalar`` forces one (the tests do).
Threads split the output features; their number is ``torch.get_num_threads()``.

Training (``int8_ternary_matmul``) runs on ``torch._int_mm`` for per-row / per-tensor
scales (exact int32, VNNI inside oneDNN) and on the packed C kernel for groups. The
backward (:func:`ternary_linear_backward`) runs its two GEMMs in the precision the
``backward_precision`` option names: ``"fp32"`` (the reference numerics), ``"bf16"`` or
``"int8"`` (grad_input as int8 x ternary ``torch._int_mm``, grad_weight in bf16).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
import weakref
from pathlib import Path

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.groups import EPS, PER_TENSOR, check_group_code, num_groups
from bitcompile.kernels.packing import (
    BLOCK_K,
    check_packed_args,
    check_packed_float_args,
    check_packed_int8_args,
    padded_in_features,
)

log = logging.getLogger(__name__)

# The training path shares these with the reference (DESIGN.md §3: same numerics).
dequantize_weight = reference.dequantize_weight
float_ternary_matmul = reference.float_ternary_matmul

ISA_NAMES = {"scalar": 0, "avx2": 1, "avx512": 2}
_ISA_BY_ID = {v: k for k, v in ISA_NAMES.items()}
_ISA_ALIASES = {"generic": "scalar", "portable": "scalar", "c": "scalar", "avx512_vnni": "avx512", "avx512vnni": "avx512"}


class _GemmArgs(ctypes.Structure):
    _fields_ = [
        ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("Kp", ctypes.c_int),
        ("group", ctypes.c_int), ("G", ctypes.c_int),
        ("xq", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("corr", ctypes.c_void_p),
        ("unit_chunks", ctypes.c_int), ("n_units", ctypes.c_int),
        ("xf", ctypes.c_void_p), ("ldxf", ctypes.c_int64),
        ("w", ctypes.c_void_p), ("sw", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64), ("out_bf16", ctypes.c_int), ("bias_bf16", ctypes.c_int),
    ]  # fmt: skip


class _PrepArgs(ctypes.Structure):
    _fields_ = [
        ("M", ctypes.c_int), ("K", ctypes.c_int), ("Kp", ctypes.c_int),
        ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("x_kind", ctypes.c_int),
        ("xq", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("corr", ctypes.c_void_p),
        ("unit_chunks", ctypes.c_int), ("n_units", ctypes.c_int), ("colscale", ctypes.c_void_p),
    ]  # fmt: skip


class _DenseArgs(ctypes.Structure):
    _fields_ = [
        ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int),
        ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("w", ctypes.c_void_p), ("ldw", ctypes.c_int64),
        ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64),
        ("xq", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("Kp", ctypes.c_int),
        ("wq", ctypes.c_void_p), ("sw", ctypes.c_void_p), ("xsum", ctypes.c_void_p),
    ]  # fmt: skip


class _EwArgs(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_int), ("M", ctypes.c_int), ("N", ctypes.c_int),
        ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("x_kind", ctypes.c_int),
        ("col", ctypes.c_void_p), ("row", ctypes.c_void_p), ("scalar", ctypes.c_float), ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64), ("out_bf16", ctypes.c_int),
    ]  # fmt: skip


def _find_library() -> Path | None:
    override = os.environ.get("BITCOMPILE_CPU_LIB")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitcpm_cpu{suffix}"
        if candidate.exists():
            return candidate
    return None


def _load():
    path = _find_library()
    if path is None:
        return None, (
            "the C kernels were not built (no C compiler when bitcompile was installed?); "
            "running the pure-PyTorch reference kernels. Reinstall with a C compiler to get them"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"could not load the C kernels from {path} ({e}); running the reference kernels"
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for name, argtypes, restype in (
        ("bc_isa_supported", [I], I),
        ("bc_best_isa", [], I),
        ("bc_plan_i8", [I, I, I, ctypes.POINTER(ctypes.c_int)], I),
        ("bc_plan_f32", [I, I], I),
        ("bc_gemm_i8", [ctypes.POINTER(_GemmArgs), I, I], None),
        ("bc_gemm_f32", [ctypes.POINTER(_GemmArgs), I, I], None),
        ("bc_prep_i8", [ctypes.POINTER(_PrepArgs), I, I], None),
        ("bc_linear_i8", [ctypes.POINTER(_GemmArgs), P, I64, I, I, P, I, I], I),
        ("bc_dense_f32", [ctypes.POINTER(_DenseArgs), I, I], None),
        ("bc_dense_i8", [ctypes.POINTER(_DenseArgs), I, I], None),
        ("bc_plan_dense_i8", [I], I),
        ("bc_pack_i2", [P, I64, I, I, P, I], I),
        ("bc_read_bytes", [P, ctypes.c_size_t, I], ctypes.c_uint64),
        ("bc_ew", [ctypes.POINTER(_EwArgs), I, I], None),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib, None


_LIB, _UNAVAILABLE_REASON = _load()
_warned = False


def available() -> bool:
    """True when the compiled C kernels are loaded (else every function runs the reference)."""
    return _LIB is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    return _UNAVAILABLE_REASON


def _lib():
    global _warned
    if _LIB is None and not _warned:
        _warned = True
        log.warning("bitcompile.kernels.cpu: %s", _UNAVAILABLE_REASON)
    return _LIB


def isa_supported(name: str) -> bool:
    """Whether this CPU (and the loaded library) can run ISA ``name`` (scalar, avx2, avx512)."""
    name = _ISA_ALIASES.get(name, name)
    return _LIB is not None and name in ISA_NAMES and bool(_LIB.bc_isa_supported(ISA_NAMES[name]))


_isa_cache: dict[str, int] = {}


def _isa_id() -> int:
    """The ISA to run now: ``BITCOMPILE_ISA`` if set (and supported), else the best one."""
    env = os.environ.get("BITCOMPILE_ISA", "auto")
    isa_id = _isa_cache.get(env)
    if isa_id is None:
        isa_id = _isa_cache[env] = _resolve_isa(env)
    return isa_id


def _resolve_isa(env: str) -> int:
    want = env.strip().lower()
    want = _ISA_ALIASES.get(want, want)
    if want in ("", "auto"):
        return _LIB.bc_best_isa()
    if want not in ISA_NAMES:
        raise ValueError(f"BITCOMPILE_ISA={want!r} is not one of: auto, {', '.join(ISA_NAMES)}")
    if not _LIB.bc_isa_supported(ISA_NAMES[want]):
        raise ValueError(f"BITCOMPILE_ISA={want!r}: this CPU does not support it; unset it or pick another ISA")
    return ISA_NAMES[want]


def isa() -> str:
    """Name of the ISA the kernels run on now ("reference" when the C kernels are unavailable)."""
    return _ISA_BY_ID[_isa_id()] if _LIB is not None else "reference"


def kernel_isa(group_code: int, activations: str = "int8") -> str:
    """ISA of the kernel that actually runs for this group mode (some group sizes use the scalar kernel)."""
    if _LIB is None:
        return "reference"
    if activations == "int8":
        return _ISA_BY_ID[_LIB.bc_plan_i8(_isa_id(), group_code, BLOCK_K, ctypes.byref(ctypes.c_int()))]
    return _ISA_BY_ID[_LIB.bc_plan_f32(_isa_id(), group_code)]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _out(m: int, n: int, out_dtype: torch.dtype) -> tuple[Tensor, int]:
    if out_dtype == torch.bfloat16:
        return torch.empty((m, n), dtype=torch.bfloat16), 1
    return torch.empty((m, n), dtype=torch.float32), 0


def _prep(x: Tensor, kind: int, k: int, kp: int, isa_id: int, unit_chunks: int | None, colscale: Tensor | None = None):
    """Quantize (fp32/bf16 x, times ``colscale`` per column if given) or copy (int8 x) into a
    zero-padded (M, kp) int8 buffer, with corr sums."""
    m = x.shape[0]
    xq = torch.empty((m, kp), dtype=torch.int8)
    sx = torch.empty((m,), dtype=torch.float32) if kind != 2 else None
    corr, n_units = None, 0
    if unit_chunks is not None:
        n_units = -(-(kp // 64) // unit_chunks)
        corr = torch.empty((m, n_units * 16), dtype=torch.int32)
    a = _PrepArgs(
        m, k, kp, _ptr(x), x.stride(0) if m else k, kind, _ptr(xq), _ptr(sx), _ptr(corr), unit_chunks or 1, n_units,
        _ptr(colscale),
    )  # fmt: skip
    _LIB.bc_prep_i8(ctypes.byref(a), isa_id, _threads())
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


_EW_SCALE, _EW_TERNARY, _EW_UNPACK = 0, 1, 2
_EW_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.int32: 3}


def _fp32_vector(t: Tensor | None, length: int, what: str) -> Tensor | None:
    """``t`` as a contiguous fp32 vector of exactly ``length`` values (the C code reads that many)."""
    if t is None:
        return None
    if t.numel() != length or sum(d != 1 for d in t.shape) > 1:
        raise ValueError(f"{what} must hold {length} values (one per {'row' if what == 'row' else 'column'}), got shape {tuple(t.shape)}")
    return t.float().contiguous().reshape(-1)


def _ew(op: int, x: Tensor, out: Tensor, row=None, col=None, scalar: float = 1.0, bias=None) -> Tensor:
    """One C pass (csrc/bc_passes.c) over the rows of 2-D ``x`` into the rows of 2-D ``out``
    (same shape, except for the 2-bit decode: packed rows in, ``(rows, K)`` int8 out)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = out.shape
    kind = 0 if op == _EW_UNPACK else _EW_KINDS[x.dtype]
    row, col, bias = _fp32_vector(row, m, "row"), _fp32_vector(col, n, "col"), _fp32_vector(bias, n, "bias")
    if m and n:
        a = _EwArgs(
            op, m, n, _ptr(x), x.stride(0), kind, _ptr(col), _ptr(row), scalar, _ptr(bias),
            _ptr(out), out.stride(0), int(out.dtype == torch.bfloat16),
        )  # fmt: skip
        _LIB.bc_ew(ctypes.byref(a), _isa_id(), _threads())
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
    if _lib() is None or x.dtype not in _EW_KINDS or out_dtype not in (torch.float32, torch.bfloat16):
        m, n = x.shape
        row, col, bias = _fp32_vector(row, m, "row"), _fp32_vector(col, n, "col"), _fp32_vector(bias, n, "bias")
        y = x.float()
        for factor in (col, None if row is None else row[:, None]):
            if factor is not None:
                y = y * factor.float()
        y = y * scalar if scalar != 1.0 else y
        return out.copy_(y + bias.float() if bias is not None else y)
    return _ew(_EW_SCALE, x, out, row=row, col=col, scalar=scalar, bias=bias)


def quantize_activations(x2d: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8 (bit-exact with :func:`reference.quantize_activations`), one fused C pass.

    With ``col_scale`` ``(K,)`` it quantizes ``x2d.float() * col_scale`` without forming that
    product matrix (the int8 grad_input folds the weight's per-row scales in this way).
    """
    col_scale = _fp32_vector(col_scale, x2d.shape[-1], "col")
    lib = _lib()
    if lib is None or x2d.dim() != 2 or x2d.shape[1] == 0 or x2d.dtype not in (torch.float32, torch.bfloat16) or x2d.requires_grad:
        return reference.quantize_activations(x2d if col_scale is None else x2d.float() * col_scale)
    x = x2d.contiguous()
    kind = 0 if x.dtype == torch.float32 else 1
    xq, sx, _, _ = _prep(x, kind, x.shape[1], x.shape[1], _isa_id(), None, col_scale)
    return xq, sx


# NOTE: from this many tokens on, per-row / per-tensor scales, the packed path decodes the
# 2-bit weights tile by tile into int8 and runs oneDNN's int8 GEMM (torch._int_mm) on each
# tile: our VNNI microkernel reaches ~330 G int8 MAC/s per core where oneDNN reaches ~410, and
# at large M the decode (one pass writing K bytes per weight row) is amortized. Measured
# (docs/kernels.md, VNNI time / this path's, T = 1 and 2, K x N = 4096^2 and 11008 x 4096):
# M = 512 0.91-1.06, M = 1024 1.02-1.18, M = 2048 1.11-1.28; M <= 256 slower.
ONEDNN_MIN_TOKENS = 1024
# weight rows decoded per tile (one int8 buffer, reused): each tile re-reads the activations,
# the whole matrix at once left L3 (M = 2048, K = N = 4096: 1024 rows 73 ms, all 4096 95 ms;
# 256-2048 rows within 10 % of each other at K = 4096 and 11008)
DECODE_TILE_ROWS = 1024


def _packed_int8_onednn(x: Tensor, kind: int, x_scales: Tensor | None, packed, w_scales, k, bias, y: Tensor) -> Tensor:
    """Large-M per-row / per-tensor W1.58A8 into ``y`` (M, N) fp32/bf16: decoded weight tiles x
    ``torch._int_mm``, scaled in the kernels' order of roundings (bit-identical with the packed
    C kernel)."""
    xq, sx = (x, x_scales) if kind == 2 else quantize_activations(x)
    n = packed.shape[0]
    rows = min(n, DECODE_TILE_ROWS)
    tile = torch.empty((rows, k), dtype=torch.int8)
    sw = w_scales[:, 0].float().contiguous()
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w8 = _ew(_EW_UNPACK, packed[n0:n1], tile[: n1 - n0])
        acc = int_mm(xq, w8.t())
        _ew(_EW_SCALE, acc, y[:, n0:n1], row=sx, col=sw[n0:n1], bias=None if bias is None else bias[n0:n1])
    return y


def _packed_int8(x: Tensor, kind: int, x_scales: Tensor | None, packed, w_scales, k, group_code, bias, out_dtype):
    if group_code <= PER_TENSOR and x.shape[0] >= ONEDNN_MIN_TOKENS:
        y, _ = _out(x.shape[0], packed.shape[0], out_dtype)
        y = _packed_int8_onednn(x, kind, x_scales, packed, w_scales, k, bias, y)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    isa_id = _isa_id()
    kp = padded_in_features(k)
    uc = ctypes.c_int()
    run_isa = _LIB.bc_plan_i8(isa_id, group_code, kp, ctypes.byref(uc))
    xq, sx, corr, n_units = _prep(x, kind, k, kp, run_isa, uc.value if run_isa != 0 else None)
    if sx is None:
        sx = x_scales.float().contiguous()
    m, n = x.shape[0], packed.shape[0]
    sw = w_scales.float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y, bf16 = _out(m, n, out_dtype)
    a = _GemmArgs(
        m, n, k, kp, group_code, num_groups(k, group_code), _ptr(xq), _ptr(sx), _ptr(corr), uc.value, n_units,
        None, 0, _ptr(packed), _ptr(sw), _ptr(b), _ptr(y), n, bf16,
    )  # fmt: skip
    _LIB.bc_gemm_i8(ctypes.byref(a), run_isa, _threads())
    return y if y.dtype == out_dtype else y.to(out_dtype)


def quantize_weight(weight: Tensor, group_code: int) -> tuple[Tensor, Tensor]:
    """:func:`reference.quantize_weight`, bit-identical: the scales by the same torch
    reductions, the codes ``clamp(round(w / s), -1, 1)`` in one C pass (csrc/bc_passes.c)
    instead of four fp32 ``(N, K)`` passes; it runs on every training step."""
    if group_code > 0 or weight.dim() != 2 or weight.numel() == 0 or not _on_cpu(weight) or _lib() is None:
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
    return _ew(_EW_TERNARY, w, torch.empty(w.shape, dtype=torch.int8), row=scales), scales


def _is_degenerate(m: int, n: int, k: int) -> bool:
    return m == 0 or n == 0 or k == 0


def packed_int8_matmul(
    x_codes: Tensor,
    x_scales: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """W1.58A8 serving: ``(q_x @ q_w^T) * s_x * s_w (+ bias)`` from int8 codes and 2-bit packed weights.

    Args:
        x_codes (Tensor[int8], M x K), x_scales (Tensor[fp32], M): per-token activation codes/scales.
        packed (Tensor[uint8], N x Kp/4): :func:`packing.pack_codes` output.
        w_scales (Tensor[fp32], N x n_groups), group_code: -1 per row, 0 per tensor, g > 0.
        bias (Tensor, N) or None; out_dtype: fp32 or bf16 (others are converted from fp32).

    Returns:
        Tensor (M, N) of ``out_dtype``; integer sums exact, equal to :func:`reference.packed_int8_matmul`
        within fp32 rounding (bit-exact for per-row and per-tensor scales).
    """
    check_packed_int8_args("packed_int8_matmul", x_codes, x_scales, packed, w_scales, in_features, group_code, bias)
    if _lib() is None or _is_degenerate(x_codes.shape[0], packed.shape[0], in_features) or not _on_cpu(x_codes, packed):
        return reference.packed_int8_matmul(x_codes, x_scales, packed, w_scales, in_features, group_code, bias, out_dtype)
    x = x_codes if x_codes.stride(-1) == 1 else x_codes.contiguous()
    return _packed_int8(x, 2, x_scales, packed.contiguous(), w_scales, in_features, group_code, bias, out_dtype)


def packed_float_matmul(
    x2d: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Weight-only serving: ``x @ (q_w * s_w)^T (+ bias)`` in fp32 from 2-bit packed weights, ``(M, N)``."""
    check_packed_float_args("packed_float_matmul", x2d, packed, w_scales, in_features, group_code, bias)
    if _lib() is None or _is_degenerate(x2d.shape[0], packed.shape[0], in_features) or not _on_cpu(x2d, packed):
        return reference.packed_float_matmul(x2d, packed, w_scales, in_features, group_code, bias, out_dtype)
    isa_id = _LIB.bc_plan_f32(_isa_id(), group_code)
    x = x2d.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n, k = x.shape[0], packed.shape[0], in_features
    sw = w_scales.float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y, bf16 = _out(m, n, out_dtype)
    a = _GemmArgs(
        m, n, k, padded_in_features(k), group_code, num_groups(k, group_code), None, None, None, 1, 0,
        _ptr(x), x.stride(0), _ptr(packed.contiguous()), _ptr(sw), _ptr(b), _ptr(y), n, bf16,
    )  # fmt: skip
    _LIB.bc_gemm_f32(ctypes.byref(a), isa_id, _threads())
    return y if y.dtype == out_dtype else y.to(out_dtype)


def packed_linear(
    x2d: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    quantize_activations: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """Serving forward from float activations; with ``quantize_activations`` the per-token int8
    quantization is fused into the kernel's activation-preparation pass (one read of x)."""
    if not quantize_activations:
        return packed_float_matmul(x2d, packed, w_scales, in_features, group_code, bias, out_dtype)
    check_packed_float_args("packed_linear", x2d, packed, w_scales, in_features, group_code, bias)
    if (
        _lib() is None
        or _is_degenerate(x2d.shape[0], packed.shape[0], in_features)
        or not _on_cpu(x2d, packed)
        or x2d.dtype not in (torch.float32, torch.bfloat16)
    ):
        return reference.packed_linear(x2d, packed, w_scales, in_features, group_code, bias, True, out_dtype)
    x = x2d.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    kind = 0 if x.dtype == torch.float32 else 1
    return _packed_int8(x, kind, None, packed.contiguous(), w_scales, in_features, group_code, bias, out_dtype)


def pack_codes(codes: Tensor) -> Tensor:
    """:func:`packing.pack_codes` in C (same bytes), multi-threaded; for packing on every training step."""
    from bitcompile.kernels import packing

    if _lib() is None or codes.dim() != 2 or codes.dtype != torch.int8 or not _on_cpu(codes):
        return packing.pack_codes(codes)
    q = codes if codes.stride(-1) == 1 else codes.contiguous()
    n, k = q.shape
    out = torch.empty(packing.packed_shape(n, k), dtype=torch.uint8)
    if n and _LIB.bc_pack_i2(_ptr(q), q.stride(0) if n else k, n, k, _ptr(out), _threads()) != 0:
        return packing.pack_codes(codes)  # raises the ValueError naming the bad code
    return out


def _on_cpu(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in ts)


def int8_ternary_matmul(
    x_codes: Tensor,
    x_scales: Tensor,
    w_codes: Tensor,
    w_scales: Tensor,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Training forward W1.58A8 (same contract as :func:`reference.int8_ternary_matmul`).

    Per-row / per-tensor: ``torch._int_mm(q_x, q_w.t())`` (exact int32; the ``(N, K)`` weight
    passed transposed is oneDNN's fast layout), then the reference's order of scalings, so the
    result is bit-identical. Groups: pack the codes (C, threaded) and run the packed kernel,
    which scales each exact per-group partial sum before adding it.
    """
    check_group_code(group_code)
    m, k = x_codes.shape
    n = w_codes.shape[0]
    if _is_degenerate(m, n, k) or not _on_cpu(x_codes, w_codes) or x_codes.dtype != torch.int8:
        return reference.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_code, bias, out_dtype)
    if group_code <= PER_TENSOR:
        acc = int_mm(x_codes.contiguous(), w_codes.to(torch.int8).t())
        # the reference's order of scalings, and the output dtype, in one pass
        return scale_rows(acc, row=x_scales, col=w_scales[:, 0], bias=bias, out_dtype=out_dtype)
    if _lib() is None:
        return reference.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_code, bias, out_dtype)
    packed = pack_codes(w_codes.to(torch.int8))
    return packed_int8_matmul(x_codes, x_scales, packed, w_scales, k, group_code, bias, out_dtype)


# ---- training backward in lower precision (DESIGN.md §3: "bf16/fp32 matmul; int8 optional later") ----

BACKWARD_PRECISIONS = ("fp32", "bf16", "int8")


def _bf16(a: Tensor, row: Tensor | None = None, col: Tensor | None = None) -> Tensor:
    """``a`` times the fp32 per-row / per-column scales, rounded once to bf16 (one pass)."""
    if row is None and col is None and a.dtype == torch.bfloat16:
        return a
    return scale_rows(a, row=row, col=col, out_dtype=torch.bfloat16)


def _grad_input_bf16(g: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int) -> Tensor:
    """``g @ W_q`` as a bf16 GEMM (fp32 accumulation inside oneDNN), fp32 ``(M, K)``.

    Per-row scales are folded into ``g`` (``(g * s_w) @ q_w``) so the ternary codes enter the
    GEMM exactly; per-tensor scales are applied after; groups round ``W_q`` itself to bf16.
    """
    if group_code == PER_TENSOR:
        return (_bf16(g) @ _bf16(w_codes)).float().mul_(w_scales[0, 0].float())
    if group_code < 0:
        return (_bf16(g, col=w_scales[:, 0]) @ _bf16(w_codes)).float()
    wq = reference.dequantize_weight(w_codes, w_scales.float(), group_code).to(torch.bfloat16)
    return (_bf16(g) @ wq).float()


def _grad_input_int8(
    g: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """``g @ W_q`` as int8 x ternary: ``g * s_w`` quantized per row (absmax int8, the activation
    quantizer), times the exact int8 codes with ``torch._int_mm`` (exact int32), rescaled.

    Only per-row / per-tensor scales factor out of the sum over N; groups use bf16.
    """
    if group_code > 0:
        return _grad_input_bf16(g, w_codes, w_scales, group_code)
    # the per-row scale folds into the summed dimension (N); per tensor it is applied after
    q_g, s_g = quantize_activations(g, col_scale=w_scales[:, 0] if group_code < 0 else None)
    acc = int_mm(q_g, w_codes.to(torch.int8))  # (M, N) @ (N, K), exact
    scalar = float(w_scales[0, 0]) if group_code == PER_TENSOR else 1.0
    return scale_rows(acc, row=s_g, scalar=scalar, out_dtype=out_dtype)


def ternary_linear_backward(
    grad_out: Tensor,
    saved_x: Tensor,
    x_scales: Tensor | None,
    w_codes: Tensor,
    w_scales: Tensor,
    group_code: int,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    precision: str = "fp32",
    grad_input_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Straight-through backward (contract of :func:`reference.ternary_linear_backward`).

    ``precision`` picks the GEMMs (docs/kernels.md "Training" has the measured speed and error):

    - ``"fp32"``: the reference, fp32 GEMMs.
    - ``"bf16"``: ``grad_input = (g*s_w) @ q_w`` and ``grad_weight = (g*s_x)^T @ q_x`` as bf16
      GEMMs; the int8 / ternary codes are exact in bf16, so only ``g*s`` is rounded (and the
      bf16 GEMM output). Weight-only mode rounds the saved activations too.
    - ``"int8"``: grad_input as int8 x ternary ``torch._int_mm`` on the per-row absmax int8
      quantization of ``g*s_w`` (per-row / per-tensor; groups fall back to bf16), grad_weight
      as in ``"bf16"`` (the SwitchBack split, arXiv:2304.13013: int8 for the forward and the
      input gradient, 16-bit for the weight gradient).

    grad_bias is an fp32 sum. grad_input is fp32, or ``grad_input_dtype`` where ``"int8"`` can
    write that directly (rounded once from the fp32 value); grad_weight is fp32 for ``"fp32"``
    and bf16, the GEMM's output, for ``"bf16"`` / ``"int8"``. The op converts each to its
    parameter's dtype, so bf16 models make no round trip through fp32.
    """
    if precision not in BACKWARD_PRECISIONS:
        raise ValueError(f"backward precision {precision!r} is not one of {BACKWARD_PRECISIONS}")
    m, n = grad_out.shape
    k = w_codes.shape[1]
    if precision == "fp32" or _is_degenerate(m, n, k) or not _on_cpu(grad_out, saved_x, w_codes):
        return reference.ternary_linear_backward(
            grad_out, saved_x, x_scales, w_codes, w_scales, group_code, need_grad_input, need_grad_weight, need_grad_bias
        )
    check_group_code(group_code)
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_input = grad_weight = None
    if need_grad_input:
        if precision == "int8":
            grad_input = _grad_input_int8(g, w_codes, w_scales, group_code, grad_input_dtype)
        else:
            grad_input = _grad_input_bf16(g, w_codes, w_scales, group_code)
    if need_grad_weight:
        if x_scales is not None:  # W1.58A8: (g * s_x)^T @ q_x, the int8 codes exact in bf16
            gw = _bf16(g, row=x_scales).t() @ _bf16(saved_x)
        else:  # weight-only: the saved activations themselves, rounded to bf16
            gw = _bf16(g).t() @ _bf16(saved_x)
        grad_weight = gw
    grad_bias = g.float().sum(dim=0) if need_grad_bias else None
    return grad_input, grad_weight, grad_bias


# ---- serving: one foreign call per layer ----


def can_prepare(packed: Tensor, w_scales: Tensor, bias: Tensor | None) -> bool:
    """Whether :class:`PreparedPackedLinear` can read these tensors as they are (no copy)."""
    return (
        packed.dtype == torch.uint8 and packed.is_contiguous() and w_scales.dtype == torch.float32
        and w_scales.is_contiguous()
        and (bias is None or (bias.dtype in _FLOAT_ACTIVATIONS and bias.is_contiguous()))
    )  # fmt: skip


def tensor_state(t: Tensor) -> tuple[int, int]:
    """Where a tensor's data is and how often it was changed in place. Inference-mode tensors
    have no version counter; they cannot be changed outside inference mode."""
    return t.data_ptr(), (-2 if t.is_inference() else t._version)


class PreparedPackedLinear:
    """A packed layer's constant kernel arguments, validated and laid out once.

    Why: a decode step calls every layer with one token, where the kernel itself takes a few
    microseconds; validating, converting and allocating on every call cost several times
    that (docs/serving.md). Calling this object quantizes the activations and runs the GEMM
    in one C call.

    The C code reads the caller's tensors themselves, never a copy: an in-place change that
    leaves no trace (``.data.copy_()``, ``load_state_dict`` on inference tensors, which have no
    version counter) is seen by the next call. So ``packed`` and ``w_scales`` must be
    contiguous (uint8, fp32) and ``bias`` a contiguous fp32 or bf16 vector (the kernel reads
    bf16 as it is). It keeps that storage alive (so calling it is always memory-safe) but only
    weak references to the caller's tensor objects (a cache keyed by them must not keep them
    alive). :meth:`is_current` / :meth:`serves` say whether it still reads the tensors that
    describe the layer: same objects, same data pointers (``.data =`` moves them), same
    version (``resize_`` and other in-place changes of the metadata bump it).
    """

    def __init__(self, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None):
        if _lib() is None:
            raise RuntimeError(f"PreparedPackedLinear needs the C kernels: {_UNAVAILABLE_REASON}")
        probe = torch.empty((0, in_features))
        check_packed_args("PreparedPackedLinear", probe, packed, w_scales, in_features, group_code, bias)
        if not _on_cpu(packed, w_scales, *([bias] if bias is not None else [])):
            raise ValueError("PreparedPackedLinear: packed, scales and bias must be CPU tensors")
        if not can_prepare(packed, w_scales, bias):
            raise ValueError(
                "PreparedPackedLinear: packed (uint8), scales (fp32) and bias (fp32 or bf16) must be contiguous "
                f"tensors of those dtypes, got {packed.dtype}, {w_scales.dtype}, {None if bias is None else bias.dtype}"
            )
        self._sources = tuple(None if t is None else weakref.ref(t) for t in (packed, w_scales, bias))
        self._snapshot = self._state_of(packed, w_scales, bias)
        self.isa_id = _isa_id()  # NOTE: fixed here; BITCOMPILE_ISA set later needs a new object
        self._storages = tuple(t.untyped_storage() for t in (packed, w_scales, bias) if t is not None)
        # new tensor objects on the caller's storage (not the caller's objects, which are held weakly)
        self._packed_view, self._scales_view, self._bias = (
            None if t is None else torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
            for t in (packed, w_scales, bias)
        )  # fmt: skip
        w, sw, b = packed, w_scales, bias
        kp = padded_in_features(in_features)
        uc = ctypes.c_int()
        self.run_isa = _LIB.bc_plan_i8(self.isa_id, group_code, kp, ctypes.byref(uc))
        n_units = -(-(kp // 64) // uc.value) if self.run_isa != 0 else 0
        self.out_features = n = packed.shape[0]
        self.in_features, self.group_code = in_features, group_code
        self._args = _GemmArgs(
            0, n, in_features, kp, group_code, num_groups(in_features, group_code), None, None, None, uc.value, n_units,
            None, 0, _ptr(w), _ptr(sw), _ptr(b), None, n, 0, int(b is not None and b.dtype == torch.bfloat16),
        )  # fmt: skip
        self._args_bf16 = _GemmArgs.from_buffer_copy(self._args)
        self._args_bf16.out_bf16 = 1

    @staticmethod
    def _state_of(packed: Tensor, w_scales: Tensor, bias: Tensor | None) -> tuple:
        return tensor_state(packed), tensor_state(w_scales), None if bias is None else tensor_state(bias)

    def is_current(self, packed: Tensor, w_scales: Tensor, bias: Tensor | None) -> bool:
        """Whether these are the tensors this object was built from, unchanged since (an
        in-place update bumps a version, ``.data =`` or ``share_memory_()`` moves the data,
        a replaced buffer is another object)."""
        src = self._sources
        return (
            packed is src[0]() and w_scales is src[1]() and (bias is None if src[2] is None else bias is src[2]())
            and self._state_of(packed, w_scales, bias) == self._snapshot
        )  # fmt: skip

    def serves(self, x: Tensor, buffers: dict[str, Tensor | None]) -> bool:
        """:meth:`is_current` for ``buffers["packed"]`` / ``["scales"]`` / ``["bias"]``, and ``x``
        is a CPU fp32/bf16 tensor of ``in_features`` (runs once per layer and token)."""
        return (
            x.dtype in _FLOAT_ACTIVATIONS and x.is_cpu and x.shape[-1] == self.in_features
            and self.is_current(buffers["packed"], buffers["scales"], buffers["bias"])
        )  # fmt: skip

    def __call__(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """``packed_linear(x, ..., quantize_activations=True, out_dtype)`` for CPU fp32/bf16 ``x``
        of shape ``(..., in_features)``; the output has shape ``(..., out_features)`` and
        ``out_dtype`` (default: ``x.dtype``)."""
        k = self.in_features
        if x.dtype not in _FLOAT_ACTIVATIONS or not x.is_cpu:
            raise TypeError(f"PreparedPackedLinear: activations must be CPU float32/bfloat16, got {x.dtype} on {x.device}")
        if x.shape[-1] != k:
            raise ValueError(f"PreparedPackedLinear: activations have {x.shape[-1]} features, the layer takes {k}")
        if out_dtype is None:
            out_dtype = x.dtype
        if not x.is_contiguous():
            x = x.contiguous()
        bf16 = out_dtype == torch.bfloat16
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.bfloat16 if bf16 else torch.float32)
        m = x.numel() // k if k else 0
        if k == 0:  # an empty sum: the bias alone
            y.copy_(self._bias.float().expand_as(y)) if self._bias is not None else y.zero_()
        elif m >= ONEDNN_MIN_TOKENS and self.out_features and self.group_code <= PER_TENSOR:
            kind = 0 if x.dtype == torch.float32 else 1
            w, sw, b = self._packed_view, self._scales_view, self._bias
            _packed_int8_onednn(x.view(m, k), kind, None, w, sw, k, b, y.view(m, -1))
        elif m and self.out_features:
            args = self._args_bf16 if bf16 else self._args
            kind = 0 if x.dtype == torch.float32 else 1
            if _LIB.bc_linear_i8(args, x.data_ptr(), k, kind, m, y.data_ptr(), self.run_isa, _threads()):
                raise MemoryError(f"bitcompile: no memory for the int8 activations of {m} tokens x {k} features")
        return y if y.dtype == out_dtype else y.to(out_dtype)


_FLOAT_ACTIVATIONS = (torch.float32, torch.bfloat16)
DENSE_MAX_M = 8  # above this, torch's (multi-threaded) GEMM is the faster path


def dense_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fp32 ``x2d @ weight^T (+ bias)`` for small M on all threads (torch's M=1 fp32 GEMV is
    single-threaded); torch's ``F.linear`` otherwise. Agrees with it within fp32 rounding."""
    if (
        _lib() is None
        or x2d.dim() != 2
        or x2d.shape[0] > DENSE_MAX_M
        or x2d.dtype != torch.float32
        or weight.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
        or not _on_cpu(x2d, weight)
        or weight.stride(-1) != 1
        or (bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_cpu))
        or torch.is_grad_enabled() and (x2d.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad)
    ):
        return torch.nn.functional.linear(x2d, weight, bias)  # incl. a broadcast bias
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    n, k = weight.shape
    if x2d.shape[1] != k:
        raise ValueError(f"dense_linear: activations have {x2d.shape[1]} features, the weight has {k}")
    m = x2d.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    if m and n:
        b = None if bias is None else bias.contiguous()
        a = _DenseArgs(m, n, k, x2d.data_ptr(), x2d.stride(0), weight.data_ptr(), weight.stride(0), _ptr(b), y.data_ptr(), n)  # fmt: skip
        _LIB.bc_dense_f32(ctypes.byref(a), _isa_id(), _threads())
    return y


_INT8_DENSE_MAX_K = 65_000  # (x + 128) * w sums stay within int32 up to 66,000 products


def int8_dense_linear(
    x2d: Tensor, w_codes: Tensor, w_scales: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """W8A8 dense layer (contract of :func:`reference.int8_dense_linear`, bit-identical): per-token
    int8 activations x per-row int8 weights with VNNI, on all threads.

    Keeps nothing derived from the weights between calls (the kernel's correction term is a sum
    over the activations), so writes no version counter records are seen at once.
    """
    n, k = w_codes.shape
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"int8_dense_linear: activations must be 2-D (M, {k}), got shape {tuple(x2d.shape)}")
    if w_codes.dtype != torch.int8 or tuple(w_scales.shape) != (n, 1):
        raise ValueError(
            f"int8_dense_linear: weights must be int8 (N, K) codes with fp32 (N, 1) scales, got "
            f"{w_codes.dtype} {tuple(w_codes.shape)} and {tuple(w_scales.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"int8_dense_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    m = x2d.shape[0]
    if (
        _lib() is None
        or _is_degenerate(m, n, k)
        or not _on_cpu(x2d, w_codes)
        or x2d.dtype not in _FLOAT_ACTIVATIONS
        or out_dtype != torch.float32
        or k > _INT8_DENSE_MAX_K
    ):
        return reference.int8_dense_linear(x2d, w_codes, w_scales, bias, out_dtype)
    x = x2d.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    kp = padded_in_features(k)
    run_isa = _LIB.bc_plan_dense_i8(_isa_id())
    xq, sx, _, _ = _prep(x, 0 if x.dtype == torch.float32 else 1, k, kp, run_isa, None)
    wq = w_codes if w_codes.stride(-1) == 1 else w_codes.contiguous()
    sw = w_scales.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    a = _DenseArgs(
        m, n, k, None, 0, None, wq.stride(0), _ptr(b), y.data_ptr(), n,
        xq.data_ptr(), sx.data_ptr(), kp, wq.data_ptr(), sw.data_ptr(), None,
    )  # fmt: skip
    _LIB.bc_dense_i8(ctypes.byref(a), run_isa, _threads())
    return y
