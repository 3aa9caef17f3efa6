"""A CPU implementation of the ``torch.ops.npu`` operators bitcompile emits for Ascend.

No Ascend hardware, CANN toolkit or working ``torch_npu`` exists on our machines (installing
torch_npu without CANN breaks ``import torch``). The CANN lowering is therefore written
against the documented torch_npu 2.14 contract (shared notes ``reference/cann_npu.md``) and
verified through this module: the same schemas, registered with ``torch.library`` under the
``npu`` namespace, with

* fake (meta) impls that run the shape and dtype checks torch_npu's meta registrations run
  (1-D ``pertoken_scale``, broadcastable batch dims, the dtype-combination table,
  transposition of ``x2`` / ``weight`` inferred from strides) plus the documented kernel
  constraints (last dims <= 65535, fp16/bf16 activations, group sizes multiple of 32), so
  that a graph Ascend would reject fails at compile time on CPU too;
* CPU kernels that follow the documented math and Huawei's Python goldens: exact integer
  accumulation, fp32 dequantization in the golden's order, the int64 scale encoding of
  ``npu_trans_quant_param`` with its truncation to 19 bits (FP19), and the low-nibble-first
  int4 packing of ``npu_convert_weight_to_int4pack``.

It is registered by :func:`ensure_npu_ops` only when the real torch_npu is not importable, and
never when ``torch.ops.npu`` already holds these ops. The probe never imports a torch_npu that
might be broken into this process: a broken install is detected in a subprocess (see
:func:`_torch_npu_works`). torch_npu is never imported when bitcompile is imported.

What the emulator cannot tell us (real hardware numerics such as the tie-rounding of
``npu_dynamic_quant``, FRACTAL_NZ storage, performance) is listed in docs/cann.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: The torch_npu 2.14 schemas, verbatim (wheel ``npu_native_functions_by_codegen.yaml``).
SCHEMAS: dict[str, str] = {
    "npu_dynamic_quant": (
        "npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
        'int? dst_type=None, str quant_mode="pertoken", float dst_type_max=0.0) -> (Tensor, Tensor)'
    ),
    "npu_quant_matmul": (
        "npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
        "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, "
        "int? x2_dtype=None, int? pertoken_scale_dtype=None, int? scale_dtype=None, "
        "int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor"
    ),
    "npu_weight_quant_batchmatmul": (
        "npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
        "Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, "
        "Tensor? bias=None, int antiquant_group_size=0, int inner_precise=0, int? weight_dtype=None) -> Tensor"
    ),
    "npu_convert_weight_to_int4pack": "npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor",
    "npu_trans_quant_param": "npu_trans_quant_param(Tensor scale, Tensor? offset=None, int? round_mode=0) -> Tensor",
    "npu_format_cast": (
        "npu_format_cast(Tensor self, int acl_format, *, int? customize_dtype=None, int? input_dtype=None) -> Tensor"
    ),
}

#: ScalarType enum values torch_npu's ``int?`` dtype arguments carry (wheel _meta_registrations.py).
DTYPE_ENUM: dict[int, torch.dtype] = {
    0: torch.uint8,
    1: torch.int8,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    12: torch.qint8,
    13: torch.quint8,
    15: torch.bfloat16,
    16: torch.quint4x2,
}
#: torch_npu-only enum values with no torch.dtype (int4, hifloat8, float8_e8m0fnu, float4_e2m1fn_x2).
NPU_ONLY_DTYPES = {285: "int4", 290: "hifloat8", 293: "float8_e8m0fnu", 296: "float4_e2m1fn_x2"}
ENUM_OF_DTYPE = {dtype: value for value, dtype in DTYPE_ENUM.items()}

#: ACL storage formats (aclFormat.md); on CPU every one is stored as ND.
ACL_FORMATS = {0: "NCHW", 1: "NHWC", 2: "ND", 3: "NC1HWC0", 4: "FRACTAL_Z", 29: "FRACTAL_NZ"}
ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 2, 29

#: Documented limit on the last dims (K, N) of the quantized matmuls.
MAX_LAST_DIM = 65535
INT4_PER_INT32 = 8

_FP19_MASK = 0xFFFFE000  # sign, exponent and the top 10 mantissa bits of an fp32 survive
_DEQ_FLAG = 1 << 46  # bit 46 marks the int64 as a dequant parameter
_OFFSET_SHIFT, _OFFSET_BITS = 37, 9


def as_dtype(value: int | torch.dtype | None, arg: str) -> torch.dtype | None:
    """A dtype argument given either as ``torch.dtype`` or as torch_npu's integer enum."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, int) and value in DTYPE_ENUM:
        return DTYPE_ENUM[value]
    if value in NPU_ONLY_DTYPES:
        raise NotImplementedError(
            f"{arg}={value} ({NPU_ONLY_DTYPES[value]}) is an Ascend-950-only dtype the emulator does not model"
        )
    raise RuntimeError(f"{arg}={value!r} is not a dtype enum torch_npu knows (expected one of {sorted(DTYPE_ENUM)})")


def is_transposed(t: Tensor) -> bool:
    """torch_npu's ``is_transpose_last_two_dims``: the last two dims are a transposed contiguous matrix."""
    if t.dim() < 2:
        return False
    return t.stride(-2) == 1 and t.stride(-1) == t.size(-2) and t.size(-1) > 1


def _check_layout(t: Tensor, name: str, op: str) -> None:
    torch._check(
        t.is_contiguous() or is_transposed(t),
        lambda: f"{op}: {name} must be contiguous or a transpose of its last two dims, got strides {tuple(t.stride())}",
    )


def _unsupported(op: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"{op}: {what} is not modelled by bitcompile's npu emulator (see docs/cann.md)")


# --------------------------------------------------------------------------------------------
# int4 packing and int64 scale encoding
# --------------------------------------------------------------------------------------------
# npu_convert_weight_to_int4pack: 8 int4 values per int32, element i of each group of 8
# along the last dim in bits [4i, 4i+4) (low nibble first):
#     int32 = [w7 w6 w5 w4 w3 w2 w1 w0]   (w0 in bits 0-3, w7 in bits 28-31)


def pack_int4(values: Tensor) -> Tensor:
    """int values in [-8, 7] ``(..., n)`` → int32 ``(..., n / 8)``, low nibble first."""
    nibbles = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], -1, INT4_PER_INT32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    word = (nibbles << shifts).sum(dim=-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: int32 ``(..., m)`` → int8 ``(..., 8 m)``, sign-extended."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).reshape(*packed.shape[:-1], -1)


def encode_quant_param(scale: Tensor, offset: Tensor | None = None) -> Tensor:
    """``npu_trans_quant_param`` round_mode 0: fp32 scale (and offset) → int64 dequant parameters.

    ``(f32bits(scale) & 0xFFFFE000) | 1 << 46``: the scale is *truncated* to 19 bits (1 sign,
    8 exponent, 10 mantissa), a relative error of up to 2**-10. An offset is rounded, clipped
    to [-256, 255] and stored as 9-bit two's complement in bits 37-45.
    """
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    word = (bits & _FP19_MASK) | _DEQ_FLAG
    if offset is not None:
        off = torch.clamp(torch.round(offset.float()), -256, 255).to(torch.int64) & ((1 << _OFFSET_BITS) - 1)
        word = word | (off << _OFFSET_SHIFT)
    return word


def decode_quant_param(word: Tensor) -> tuple[Tensor, Tensor]:
    """int64 dequant parameters → ``(scale fp32, offset fp32)`` as the matmul reads them."""
    low = (word & 0xFFFFFFFF) & _FP19_MASK
    scale = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32).view(torch.float32)
    off = (word >> _OFFSET_SHIFT) & ((1 << _OFFSET_BITS) - 1)
    off = torch.where(off >= 1 << (_OFFSET_BITS - 1), off - (1 << _OFFSET_BITS), off)
    return scale, off.float()


# --------------------------------------------------------------------------------------------
# npu_dynamic_quant
# --------------------------------------------------------------------------------------------
_DYNAMIC_QUANT = "npu_dynamic_quant"


def _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max):
    dst = as_dtype(dst_type, "dst_type") or torch.int8
    torch._check(
        input.dtype in (torch.float16, torch.bfloat16),
        lambda: f"{_DYNAMIC_QUANT}: input dtype must be float16 or bfloat16, got {input.dtype}",
    )
    torch._check(input.dim() >= 2, lambda: f"{_DYNAMIC_QUANT}: input must be at least 2-D, got {input.dim()}-D")
    if group_index is not None:
        raise _unsupported(_DYNAMIC_QUANT, "group_index (MoE grouped quantization)")
    if quant_mode != "pertoken":
        raise _unsupported(_DYNAMIC_QUANT, f"quant_mode={quant_mode!r} (chip support unverified)")
    if dst_type_max != 0.0:
        raise _unsupported(_DYNAMIC_QUANT, "dst_type_max (float8 / hifloat8 outputs)")
    torch._check(
        dst in (torch.int8, torch.quint4x2),
        lambda: f"{_DYNAMIC_QUANT}: dst_type must be int8 or quint4x2, got {dst}",
    )
    k = input.size(-1)
    if dst == torch.quint4x2:
        torch._check(k % 8 == 0, lambda: "If dst_dtype is quint4x2, last dim must be divisible by 8")
    if smooth_scales is not None:
        torch._check(
            smooth_scales.dim() == 1 and smooth_scales.size(0) == k,
            lambda: f"{_DYNAMIC_QUANT}: smooth_scales must have shape ({k},), got {tuple(smooth_scales.shape)}",
        )
    return dst


def _dynamic_quant_fake(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                        dst_type_max=0.0):  # fmt: skip
    dst = _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    scale = input.new_empty(input.shape[:-1], dtype=torch.float32)
    if dst == torch.quint4x2:
        return input.new_empty((*input.shape[:-1], input.size(-1) // 8), dtype=torch.int32), scale
    return input.new_empty(input.shape, dtype=torch.int8), scale


def _dynamic_quant_cpu(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                       dst_type_max=0.0):  # fmt: skip
    """Golden: fp32 compute, ``scale = rowmax|x| / qmax`` (a zero row gets scale 1), round half to even."""
    dst = _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    x = input.float()
    if smooth_scales is not None:
        x = x * smooth_scales.float()
    qmax = 7.0 if dst == torch.quint4x2 else 127.0
    scale = x.abs().amax(dim=-1) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(x / scale[..., None]), -qmax - 1, qmax)
    if dst == torch.quint4x2:
        return pack_int4(q), scale
    return q.to(torch.int8), scale


# --------------------------------------------------------------------------------------------
# npu_quant_matmul
# --------------------------------------------------------------------------------------------
_QUANT_MATMUL = "npu_quant_matmul"
_F32, _BF16, _F16, _I8, _I32, _I64 = torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64

# Atlas A2/A3 dtype combinations (op-plugin torch_npu-npu_quant_matmul.md, table 2):
# (x dtype, output, scale dtypes, bias dtypes (None = absent), pertoken: "no"/"opt"/"req", offset allowed)
_QMM_TABLE = (
    (_I8, _F16, {_I64, _F32}, {_I32, None}, "no", False),
    (_I8, _I8, {_I64, _F32}, {_I32, None}, "no", True),
    (_I8, _BF16, {_F32, _BF16}, {_I32, _BF16, _F32, None}, "opt", False),
    (_I8, _F16, {_F32}, {_I32, _F16, _F32, None}, "req", False),
    (_I8, _I32, {_F32, _BF16}, {_I32, None}, "no", False),
    (_I32, _F16, {_I64, _F32}, {_I32, None}, "no", False),
    (_I32, _F16, {_F32}, {_I32, _F16, _F32, None}, "req", False),
    (_I32, _BF16, {_F32, _BF16}, {_I32, _BF16, _F32, None}, "req", False),
)


def _name(dtype) -> str:
    return "None" if dtype is None else str(dtype).removeprefix("torch.")


def _qmm_dtype_check(x1, x2, scale, offset, pertoken_scale, bias, out) -> None:
    torch._check(
        x1.dtype == x2.dtype,
        lambda: f"x1's type and x2's type should be same, but x1.dtype is {x1.dtype} and x2.dtype is {x2.dtype}",
    )
    torch._check(x1.dtype in (_I8, _I32), lambda: f"input's type supported for int8 and int32, but now is {x1.dtype}")
    torch._check(
        scale.dtype in (_F32, _I64, _BF16),
        lambda: f"scale's type supported for float32, int64 and bfloat16, but scale.dtype is {scale.dtype}",
    )
    if pertoken_scale is not None:
        torch._check(
            pertoken_scale.dtype == _F32,
            lambda: f"pertoken_scale's type supported for float32, but pertoken_scale.dtype is {pertoken_scale.dtype}",
        )
    if offset is not None:
        torch._check(offset.dtype == _F32, lambda: f"offset's type supported for float32, but is {offset.dtype}")
    bias_dtype = None if bias is None else bias.dtype
    for x_dtype, out_dtype, scales, biases, pertoken, offset_ok in _QMM_TABLE:
        if (x1.dtype, out) != (x_dtype, out_dtype) or scale.dtype not in scales or bias_dtype not in biases:
            continue
        if (pertoken == "no" and pertoken_scale is not None) or (pertoken == "req" and pertoken_scale is None):
            continue
        if offset is not None and not offset_ok:
            continue
        return
    combo = (
        f"x1={_name(x1.dtype)}, x2={_name(x2.dtype)}, scale={_name(scale.dtype)}, "
        f"offset={_name(None if offset is None else offset.dtype)}, bias={_name(bias_dtype)}, "
        f"pertoken_scale={_name(None if pertoken_scale is None else pertoken_scale.dtype)}, output_dtype={_name(out)}"
    )
    raise RuntimeError(f"{_QUANT_MATMUL}: unsupported dtype combination on Atlas A2/A3 ({combo}); see docs/cann.md")


def _qmm_geometry(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                  pertoken_scale_dtype, scale_dtype, group_sizes, y_scale):  # fmt: skip
    """Check everything torch_npu checks; return (batch shape, m, k, n, x2 transposed, output dtype)."""
    for arg, value in (("x1_dtype", x1_dtype), ("x2_dtype", x2_dtype), ("pertoken_scale_dtype", pertoken_scale_dtype),
                       ("scale_dtype", scale_dtype)):  # fmt: skip
        if value is not None:
            raise _unsupported(_QUANT_MATMUL, f"{arg} (float8 / float4 / hifloat8 inputs, Ascend 950 only)")
    if group_sizes is not None or y_scale is not None:
        raise _unsupported(_QUANT_MATMUL, "group_sizes / y_scale (block and mx quantization)")
    out = as_dtype(output_dtype, "output_dtype") or _I8
    if x1.dtype == _I8 and x2.dtype == _I32:
        raise _unsupported(_QUANT_MATMUL, "A8W4 (int8 x1 with int32-packed int4 x2)")
    torch._check(2 <= x1.dim() <= 6, lambda: "x1 dim num should be 2 ~ 6, please check x1 dim num")
    torch._check(2 <= x2.dim() <= 6, lambda: "x2 dim num should be 2 ~ 6, please check x2 dim num")
    _qmm_dtype_check(x1, x2, scale, offset, pertoken_scale, bias, out)
    is_a4w4 = x1.dtype == _I32
    if is_a4w4:
        torch._check(x2.dim() == 2, lambda: "x2 dim num should be 2 when x1's dtype is int32, please check x2 dim num")
    _check_layout(x1, "x1", _QUANT_MATMUL)
    _check_layout(x2, "x2", _QUANT_MATMUL)
    transposed = is_transposed(x2)
    m = x1.size(-2)
    if is_a4w4 and not transposed:  # x1 (m, k/8), x2 (k, n/8)
        k, n = x1.size(-1) * INT4_PER_INT32, x2.size(-1) * INT4_PER_INT32
        torch._check(x2.size(-2) == k, lambda: "k dim of x2 should be 8 multiple of k dim of x1")
    else:  # int8, or int4 with x2 = (n, k/8).t()
        k, n = x1.size(-1), x2.size(-1)
        torch._check(
            x2.size(-2) == k,
            lambda: f"k dim of x1 and x2 need be same, got x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}",
        )
        if is_a4w4:
            k *= INT4_PER_INT32
    torch._check(
        k <= MAX_LAST_DIM and n <= MAX_LAST_DIM,
        lambda: f"{_QUANT_MATMUL}: k={k} and n={n} must not exceed {MAX_LAST_DIM} (last-dim limit of x1 and x2)",
    )
    batch = torch.broadcast_shapes(tuple(x1.shape[:-2]), tuple(x2.shape[:-2])) if max(x1.dim(), x2.dim()) > 2 else ()
    torch._check(scale.dim() == 1, lambda: "the scale dim num must be 1, please check scale dim num")
    torch._check(
        scale.size(0) in (1, n),
        lambda: "the scale 1st dim value must be 1 or x2 n dim value, please check scale 1st dim value",
    )
    if offset is not None:
        torch._check(offset.dim() == 1, lambda: "the offset dim num must be 1, please check offset dim num")
        torch._check(offset.size(0) in (1, n), lambda: "the offset 1st dim value must be 1 or x2 n dim value")
    if pertoken_scale is not None:
        torch._check(
            pertoken_scale.dim() == 1,
            lambda: "the pertoken_scale dim num must be 1, please check scale dim num "
            f"(got shape {tuple(pertoken_scale.shape)}; flatten x1 to 2-D first)",
        )
        torch._check(
            pertoken_scale.size(0) == m,
            lambda: "the pertoken_scale 1st dim value must be x1 m dim value, please check scale 1st dim value",
        )
    if bias is not None:
        torch._check(
            bias.dim() in (1, 3) if not is_a4w4 else bias.dim() == 1,
            lambda: f"bias_dim_num should be 1 or 3, please check bias dim num (got {bias.dim()})",
        )
        torch._check(bias.size(-1) == n, lambda: "bias last dim should be equal to x2 n dim, please check bias shape")
        if bias.dim() == 3:
            bsz = 1
            for d in batch:
                bsz *= d
            torch._check(
                len(batch) == 1 and bias.size(0) == bsz and bias.size(1) == 1,
                lambda: "when bias dim is 3, it must be (batch, 1, n) and out dim need to be 3",
            )
    return tuple(batch), m, k, n, transposed, out


def _quant_matmul_fake(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                       x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                       group_sizes=None, y_scale=None):  # fmt: skip
    batch, m, _, n, _, out = _qmm_geometry(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype,
                                           x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)  # fmt: skip
    return x1.new_empty((*batch, m, n), dtype=out)


def _int_operand(t: Tensor, packed_along_last: bool) -> Tensor:
    """int8 values, or int32 words unpacked to int4 values along the dim they were packed on."""
    if t.dtype != _I32:
        return t
    if packed_along_last:
        return unpack_int4(t)
    return unpack_int4(t.transpose(-1, -2)).transpose(-1, -2)


def _quant_matmul_cpu(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                      x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                      group_sizes=None, y_scale=None):  # fmt: skip
    """``out = (x1 @ x2 [+ int32 bias]) * scale [* pertoken_scale] [+ float bias | + offset]`` (aclnnQuantMatmulV4).

    The integer product is exact (fp64 holds any int32 sum exactly); dequantization is fp32 in
    the golden's order ``acc * scale * pertoken``; the result is cast to ``output_dtype``.
    """
    _, _, _, _, transposed, out = _qmm_geometry(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype,
                                                x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)  # fmt: skip
    a = _int_operand(x1, True)
    b = _int_operand(x2, not transposed)
    acc = torch.matmul(a.double(), b.double())  # exact: |sum| < 2**31 << 2**53
    if bias is not None and bias.dtype == _I32:
        acc = acc + bias.double()
    if out == _I32:
        return acc.to(_I32)
    off = offset
    if scale.dtype == _I64:
        s, decoded_offset = decode_quant_param(scale)
        off = decoded_offset if offset is None else offset
    elif scale.dtype == _F32 and pertoken_scale is None and out not in (_BF16, _I32):
        # Eager torch_npu converts an fp32 scale with npu_trans_quant_param itself here
        # (op-plugin QuantMatmulKernelNpuOpApi.cpp), so the scale loses its low 13 mantissa bits.
        s, _ = decode_quant_param(encode_quant_param(scale))
    else:
        s = scale.float()
    y = acc.float() * s
    if pertoken_scale is not None:
        y = y * pertoken_scale.float()[:, None]
    if bias is not None and bias.dtype != _I32:
        y = y + bias.float()
    if out == _I8:
        if off is not None:
            y = y + off.float()
        return torch.clamp(torch.round(y), -128, 127).to(_I8)
    return y.to(out)


# --------------------------------------------------------------------------------------------
# npu_weight_quant_batchmatmul
# --------------------------------------------------------------------------------------------
_WQBMM = "npu_weight_quant_batchmatmul"


def _wqbmm_geometry(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                    antiquant_group_size, inner_precise, weight_dtype):  # fmt: skip
    """Check the documented constraints; return (m, k, n, group_count or 0 / -1 for per-tensor/per-channel)."""
    if quant_scale is not None or quant_offset is not None:
        raise _unsupported(_WQBMM, "quant_scale / quant_offset (int8 output)")
    wd = as_dtype(weight_dtype, "weight_dtype")
    torch._check(wd in (None, weight.dtype), lambda: f"{_WQBMM}: weight_dtype={wd} does not match weight {weight.dtype}")
    torch._check(x.dim() == 2, lambda: f"{_WQBMM}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    torch._check(
        x.dtype in (_F16, _BF16), lambda: f"{_WQBMM}: x dtype must be float16 or bfloat16, got {x.dtype}"
    )
    torch._check(weight.dim() == 2, lambda: f"{_WQBMM}: weight must be 2-D (K, N), got shape {tuple(weight.shape)}")
    torch._check(
        weight.dtype in (_I8, _I32),
        lambda: f"{_WQBMM}: weight dtype must be int8 or int32 (int4 packed), got {weight.dtype}",
    )
    _check_layout(x, "x", _WQBMM)
    _check_layout(weight, "weight", _WQBMM)
    m = x.size(0)
    if weight.dtype == _I32 and weight.is_contiguous():  # (K, N/8)
        k, n = weight.size(0), weight.size(1) * INT4_PER_INT32
    elif weight.dtype == _I32:  # (N, K/8).t()
        k, n = weight.size(0) * INT4_PER_INT32, weight.size(1)
    else:
        k, n = weight.size(0), weight.size(1)
    torch._check(x.size(1) == k, lambda: f"{_WQBMM}: x {tuple(x.shape)} and weight (K={k}, N={n}) disagree on K")
    torch._check(
        1 <= k <= MAX_LAST_DIM and 1 <= n <= MAX_LAST_DIM,
        lambda: f"{_WQBMM}: K={k} and N={n} must lie in [1, {MAX_LAST_DIM}]",
    )
    torch._check(inner_precise in (0, 1), lambda: f"{_WQBMM}: inner_precise must be 0 or 1, got {inner_precise}")
    if antiquant_scale.dtype == _I64:
        raise _unsupported(_WQBMM, "int64 antiquant_scale (fp16 x, int8 transposed weight, M <= 96 special path)")
    torch._check(
        antiquant_scale.dtype == x.dtype,
        lambda: f"{_WQBMM}: antiquant_scale dtype {antiquant_scale.dtype} must equal x dtype {x.dtype}",
    )
    g = antiquant_group_size
    shape = tuple(antiquant_scale.shape)
    if g == 0:
        torch._check(
            shape in ((1,), (1, 1), (n,), (1, n)),
            lambda: f"{_WQBMM}: antiquant_scale must be (1,), (1, 1), ({n},) or (1, {n}) without groups, got {shape}",
        )
        groups = -1 if shape in ((1,), (1, 1)) and n != 1 else 0
    else:
        torch._check(
            g % 32 == 0 and 32 <= g <= k - 1,
            lambda: f"{_WQBMM}: antiquant_group_size must be 0 or a multiple of 32 in [32, K-1={k - 1}], got {g}",
        )
        groups = -(-k // g)
        torch._check(
            shape == (groups, n),
            lambda: f"{_WQBMM}: per-group antiquant_scale must be (ceil(K/g)={groups}, N={n}), got {shape}",
        )
    if antiquant_offset is not None:
        torch._check(
            tuple(antiquant_offset.shape) == shape and antiquant_offset.dtype == antiquant_scale.dtype,
            lambda: f"{_WQBMM}: antiquant_offset must match antiquant_scale in shape and dtype",
        )
    if bias is not None:
        want = _F16 if x.dtype == _F16 else _F32
        torch._check(
            bias.dtype == want,
            lambda: f"{_WQBMM}: bias must be {_name(want)} for {_name(x.dtype)} x, got {_name(bias.dtype)}",
        )
        torch._check(
            tuple(bias.shape) in ((n,), (1, n)), lambda: f"{_WQBMM}: bias must be ({n},) or (1, {n}), got {tuple(bias.shape)}"
        )
    return m, k, n, groups


def _wqbmm_fake(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None,
                antiquant_group_size=0, inner_precise=0, weight_dtype=None):  # fmt: skip
    m, _, n, _ = _wqbmm_geometry(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                 antiquant_group_size, inner_precise, weight_dtype)  # fmt: skip
    return x.new_empty((m, n), dtype=x.dtype)


def _wqbmm_cpu(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None,
               antiquant_group_size=0, inner_precise=0, weight_dtype=None):  # fmt: skip
    """``y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias`` (aclnnWeightQuantBatchMatmulV2).

    The anti-quantized weight is formed in x's dtype (fp16/bf16, as the vector unit does), the
    matmul accumulates in fp32, and the result is cast to x's dtype.
    """
    _, k, n, groups = _wqbmm_geometry(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                      antiquant_group_size, inner_precise, weight_dtype)  # fmt: skip
    if weight.dtype == _I32:
        w = _int_operand(weight, weight.is_contiguous())
    else:
        w = weight
    w = w.float()  # (K, N)
    scale = antiquant_scale.float().reshape(-1, n) if groups != -1 else antiquant_scale.float().reshape(1, 1)
    offset = None if antiquant_offset is None else antiquant_offset.float().reshape(scale.shape)
    if groups > 0:
        scale = scale.repeat_interleave(antiquant_group_size, dim=0)[:k]
        offset = None if offset is None else offset.repeat_interleave(antiquant_group_size, dim=0)[:k]
    if offset is not None:
        w = w + offset
    w = (w * scale).to(x.dtype)
    y = x.float() @ w.float()
    if bias is not None:
        y = y + bias.float().reshape(1, n)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# weight preparation: int4 pack, trans_quant_param, format_cast
# --------------------------------------------------------------------------------------------
_INT4PACK = "npu_convert_weight_to_int4pack"


def _int4pack_check(weight, inner_k_tiles):
    torch._check(weight.dtype == _I32, lambda: f"{_INT4PACK}: weight must be int32 holding int4 values, got {weight.dtype}")
    torch._check(weight.dim() == 2, lambda: f"{_INT4PACK}: weight must be 2-D, got {weight.dim()}-D")
    torch._check(weight.is_contiguous(), lambda: f"{_INT4PACK}: weight must be contiguous")
    torch._check(
        weight.size(-1) % INT4_PER_INT32 == 0,
        lambda: f"{_INT4PACK}: the last dim of weight ({weight.size(-1)}) must be divisible by 8",
    )
    torch._check(inner_k_tiles == 0, lambda: f"{_INT4PACK}: inner_k_tiles is reserved and must be 0")


def _int4pack_fake(weight, inner_k_tiles=0):
    _int4pack_check(weight, inner_k_tiles)
    return weight.new_empty((weight.size(0), weight.size(1) // INT4_PER_INT32), dtype=_I32)


def _int4pack_cpu(weight, inner_k_tiles=0):
    _int4pack_check(weight, inner_k_tiles)
    if weight.numel():
        lo, hi = int(weight.min()), int(weight.max())
        torch._check(-8 <= lo and hi <= 7, lambda: f"{_INT4PACK}: values must lie in [-8, 7], got [{lo}, {hi}]")
    return pack_int4(weight)


_TRANS = "npu_trans_quant_param"


def _trans_check(scale, offset, round_mode):
    torch._check(
        scale.dim() == 1 or (scale.dim() == 2 and scale.size(0) == 1),
        lambda: "the scale shape support only (1, ) and (1, n)",
    )
    torch._check(scale.dtype == _F32, lambda: f"{_TRANS}: scale must be float32, got {scale.dtype}")
    torch._check(round_mode in (None, 0, 1), lambda: f"round_mode should be 0 or 1, but round_mode is {round_mode}")
    if round_mode == 1:
        raise _unsupported(_TRANS, "round_mode=1 (its rounding rule is not documented)")
    if scale.dim() == 1:
        size = scale.size(0)
        if offset is not None:
            torch._check(
                offset.size(0) == size or offset.size(0) == 1 or size == 1,
                lambda: "offset first dim should be equal to scale first dim if none of them are equal to one",
            )
            size = max(size, offset.size(0))
        return (size,)
    if offset is not None:
        torch._check(
            offset.shape == scale.shape,
            lambda: "when the input shape of scale is (1, n), shape of scale and offset should be equal",
        )
    return tuple(scale.shape)


def _trans_fake(scale, offset=None, round_mode=0):
    return scale.new_empty(_trans_check(scale, offset, round_mode), dtype=_I64)


def _trans_cpu(scale, offset=None, round_mode=0):
    shape = _trans_check(scale, offset, round_mode)
    s = scale.expand(shape) if scale.dim() == 1 else scale
    o = None if offset is None else offset.expand(shape)
    return encode_quant_param(s, o).reshape(shape)


_FORMAT_CAST = "npu_format_cast"


def _format_cast_check(self, acl_format, customize_dtype, input_dtype):
    torch._check(
        acl_format in ACL_FORMATS,
        lambda: f"{_FORMAT_CAST}: acl_format={acl_format} is not one of {sorted(ACL_FORMATS)}",
    )
    if customize_dtype is not None or input_dtype is not None:
        raise _unsupported(_FORMAT_CAST, "customize_dtype / input_dtype")


def _format_cast_fake(self, acl_format, *, customize_dtype=None, input_dtype=None):
    _format_cast_check(self, acl_format, customize_dtype, input_dtype)
    return self.new_empty(self.shape)


def _format_cast_cpu(self, acl_format, *, customize_dtype=None, input_dtype=None):
    """Logical values never change with the storage format; on CPU the storage stays ND."""
    _format_cast_check(self, acl_format, customize_dtype, input_dtype)
    return self.clone()


_IMPLS = {
    "npu_dynamic_quant": (_dynamic_quant_cpu, _dynamic_quant_fake),
    "npu_quant_matmul": (_quant_matmul_cpu, _quant_matmul_fake),
    "npu_weight_quant_batchmatmul": (_wqbmm_cpu, _wqbmm_fake),
    "npu_convert_weight_to_int4pack": (_int4pack_cpu, _int4pack_fake),
    "npu_trans_quant_param": (_trans_cpu, _trans_fake),
    "npu_format_cast": (_format_cast_cpu, _format_cast_fake),
}

# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
_lock = threading.Lock()
_provider: str | None = None
_library: torch.library.Library | None = None


def _defined(name: str) -> bool:
    try:
        return hasattr(torch.ops.npu, name)
    except (AttributeError, RuntimeError):
        return False


def _torch_npu_works() -> bool:
    """Whether a working torch_npu is installed, without risking this process.

    torch_npu registers a ``torch.backends`` entry point: with auto-loading on (the default),
    ``import torch`` already imported it, so it is in ``sys.modules`` when it works. If it is
    installed but not loaded, it is imported in a *subprocess* with auto-loading off: a broken
    install (no CANN: ``libhccl.so`` missing) fails there, not here, and cannot leave a
    half-imported torch_npu behind.
    """
    if sys.modules.get("torch_npu") is not None:
        return True
    try:
        if importlib.util.find_spec("torch_npu") is None:
            return False
    except (ImportError, ValueError):
        return False
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import torch, torch_npu"], env=env, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("bitcompile: probing torch_npu failed (%s); using the CPU emulator of torch.ops.npu", err)
        return False
    if probe.returncode != 0:
        tail = (probe.stderr or "").strip().splitlines()[-1:] or ["no output"]
        log.warning("bitcompile: torch_npu is installed but does not import (%s); using the CPU emulator", tail[0])
        return False
    return True


def ensure_npu_ops() -> str:
    """Make ``torch.ops.npu.*`` (the six ops bitcompile emits) callable; return who provides them.

    Returns ``"torch_npu"`` (the real library, imported here), ``"external"`` (someone already
    defined these ops, left alone) or ``"emulator"`` (this module's CPU implementation).
    Idempotent and thread-safe.
    """
    global _provider, _library
    with _lock:
        if _provider is not None:
            return _provider
        if _torch_npu_works():
            import torch_npu  # noqa: F401  (registers torch.ops.npu.* for real)

            _provider = "torch_npu"
        elif any(_defined(name) for name in SCHEMAS):
            _provider = "external"
        else:
            lib = torch.library.Library("npu", "DEF")  # noqa: TOR901 (kept alive in _library)
            for name, schema in SCHEMAS.items():
                lib.define(schema)
                cpu, fake = _IMPLS[name]
                lib.impl(name, cpu, "CPU")
                torch.library.register_fake(f"npu::{name}", fake, lib=lib)
            _library = lib
            _provider = "emulator"
        log.info("bitcompile: torch.ops.npu provided by %s", _provider)
        return _provider


def provider() -> str | None:
    """Who provides ``torch.ops.npu`` (None until :func:`ensure_npu_ops` ran)."""
    return _provider
