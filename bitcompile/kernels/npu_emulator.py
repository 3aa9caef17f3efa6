"""A CPU implementation of the ``torch.ops.npu`` operators bitcompile emits for Ascend.

No Ascend hardware, CANN toolkit or working ``torch_npu`` exists on our machines (installing
torch_npu without CANN breaks ``import torch``). The CANN lowering is therefore written
against the torch_npu 2.14 contract and the CANN kernels' source (``Ascend/op-plugin``,
``hicann/ops-nn``; docs/cann.md cites the files) and verified through this module: the same
schemas, registered with ``torch.library`` under the ``npu`` namespace, with

* fake (meta) impls that run the shape and dtype checks torch_npu's meta registrations run
  (1-D ``pertoken_scale``, broadcastable batch dims, the dtype-combination table,
  transposition of ``x2`` / ``weight`` inferred from strides) plus the documented kernel
  constraints (last dims <= 65535 where the tiling applies it, fp16/bf16 activations, group
  sizes multiple of 32, per-chip support), so that a graph Ascend would reject fails at
  compile time on CPU too;
* CPU kernels that follow the *hardware* formulas where they differ from the documented
  math: ``npu_dynamic_quant`` multiplies by ``127 / rowmax`` (ops-nn ``dynamic_quant*.h``),
  ``npu_quant_matmul``'s two dequantization orders, the small-M "MSD" split of
  ``npu_weight_quant_batchmatmul``, the int64 scale encoding of ``npu_trans_quant_param``
  (both round modes), the low-nibble-first int4 packing with its value masking;
* a model of the FRACTAL_NZ storage tag (format and C0) that ``npu_format_cast`` and
  ``npu_convert_weight_to_int4pack`` set and the matmuls check (:func:`get_npu_format`).

What is chip- or kernel-variant-dependent is a setting of :func:`emulate` (the chip, the
scale form of ``npu_dynamic_quant``, the dequantization order of ``npu_quant_matmul``).

It is registered by :func:`ensure_npu_ops` only when the real torch_npu is not importable, and
never when ``torch.ops.npu`` already holds these ops. The probe never imports a torch_npu that
might be broken into this process: a broken install is detected in a subprocess (see
:func:`_torch_npu_works`). torch_npu is never imported when bitcompile is imported.

What the emulator cannot tell us (tie rounding in hardware casts, the NZ byte layout,
performance, which kernel variant the tiling picks) is listed in docs/cann.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import logging
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator

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

#: torch_npu.Format values ((beta)torch_npu-npu_format_cast.md); on CPU the bytes stay ND and
#: only FRACTAL_NZ's tag (format, C0) is modelled.
ACL_FORMATS = {
    -1: "UNDEFINED", 0: "NCHW", 1: "NHWC", 2: "ND", 3: "NC1HWC0", 4: "FRACTAL_Z", 12: "NC1HWC0_C04",
    16: "HWCN", 27: "NDHWC", 29: "FRACTAL_NZ", 30: "NCDHW", 32: "NDC1HWC0", 33: "FRACTAL_Z_3D", 35: "NC",
    47: "NCL",
}  # fmt: skip
ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 2, 29

#: Last-dim limit of the quantized matmuls (quant_batch_matmul_v3_tiling.cpp LAST_AXIS_LIMIT,
#: the weight-quant docs' K, N in [1, 65535]).
MAX_LAST_DIM = 65535
#: What the A2/A3 quant_batch_matmul_v3 tiling allows instead for int8 x int8 with a 1-D
#: fp32/bf16 scale and a 1-D pertoken_scale (CheckShapeInBoundary: DAV_2201 && CheckInputInBoundary).
MAX_DIM_INT32 = 2**31 - 1
INT4_PER_INT32 = 8

#: The chips modelled. A2 (910B) and A3 (910_93) share every rule the emulator checks.
CHIPS = ("A2", "A3", "310P")
#: ``npu_dynamic_quant``'s returned scale (ops-nn quant/dynamic_quant/op_kernel):
#: ``rowmax * (1/127)`` in dynamic_quant_db.h, _multi_row.h, _single_row.h and the 310P kernels;
#: ``1 / (127/rowmax)`` in dynamic_quant.h and _large_shape_opt.h. The tiling picks the kernel.
DYNAMIC_QUANT_SCALE_FORMS = ("times_inverse", "reciprocal")
#: ``npu_quant_matmul`` pertoken dequantization: ``(acc * scale) * pertoken`` (Huawei's golden
#: and the general kernel) or ``acc * (pertoken * scale)`` (quant_batch_matmul_v3_pertoken_opt.h
#: MulPertokenAndScale, chosen by the tiling for decode-like shapes).
DEQUANT_ORDERS = ("scale_then_pertoken", "pertoken_opt")


@dataclasses.dataclass(frozen=True)
class EmulatorModel:
    """What the emulator reproduces where hardware behaviour depends on the chip or the kernel variant."""

    chip: str = "A2"
    dynamic_quant_scale: str = "times_inverse"
    dequant_order: str = "scale_then_pertoken"
    msd: bool = True  # model the small-M MSD kernels of npu_weight_quant_batchmatmul where they run

    def __post_init__(self) -> None:
        for name, allowed in (("chip", CHIPS), ("dynamic_quant_scale", DYNAMIC_QUANT_SCALE_FORMS),
                              ("dequant_order", DEQUANT_ORDERS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"npu emulator: {name}={getattr(self, name)!r} is not one of {allowed}")


_model = EmulatorModel()


def current_model() -> EmulatorModel:
    """The emulator's current :class:`EmulatorModel`."""
    return _model


@contextlib.contextmanager
def emulate(**settings) -> Iterator[EmulatorModel]:
    """Run the emulated ops as on another chip / kernel variant, e.g. ``with emulate(chip="310P"):``."""
    global _model
    previous = _model
    _model = dataclasses.replace(previous, **settings)
    try:
        yield _model
    finally:
        _model = previous


def _a2_a3() -> bool:
    return _model.chip in ("A2", "A3")


def _require_a2_a3(op: str) -> None:
    if not _a2_a3():
        raise RuntimeError(f"{op} is documented for Atlas A2/A3 only, not {_model.chip} (see docs/cann.md)")


# --------------------------------------------------------------------------------------------
# storage format tags (FRACTAL_NZ and its C0)
# --------------------------------------------------------------------------------------------
# On an NPU a tensor carries its storage format; a CPU tensor cannot, so the emulator keeps a
# tag per storage (keyed by its data pointer, dropped when the tagged tensor dies). Views of
# a tagged tensor (a .t()) share the tag, as on the NPU.
_NZ_C0_DEFAULT = {torch.int8: 32, torch.uint8: 32}  # int32 / fp32 / fp16 / bf16: 16 (npu_format_cast doc)
_format_tags: dict[int, tuple[int, int, int]] = {}  # storage data_ptr -> (format, c0, token)
_tokens = itertools.count()


def _storage_key(t: Tensor) -> int | None:
    if t.device.type != "cpu" or isinstance(t, torch._subclasses.FakeTensor) or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


def _drop_tag(key: int, token: int) -> None:
    if _format_tags.get(key, (0, 0, -1))[2] == token:
        del _format_tags[key]


def _tag_format(t: Tensor, acl_format: int, c0: int) -> Tensor:
    key = _storage_key(t)
    if key is not None and acl_format != ACL_FORMAT_ND:
        token = next(_tokens)
        _format_tags[key] = (acl_format, c0, token)
        weakref.finalize(t, _drop_tag, key, token)
    return t


def storage_format(t: Tensor) -> tuple[int, int | None]:
    """``(acl_format, C0)`` of a tensor as the emulator tracks it: ``(2, None)`` for ND."""
    key = _storage_key(t)
    tag = _format_tags.get(key) if key is not None else None
    return (tag[0], tag[1]) if tag else (ACL_FORMAT_ND, None)


def get_npu_format(t: Tensor) -> int:
    """``torch_npu.get_npu_format`` for emulated tensors."""
    return storage_format(t)[0]

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
    """int values ``(..., n)`` → int32 ``(..., n / 8)``, low nibble first.

    Only each value's low 4 bits are kept (``& 0xF``, ConvertWeightToINT4PackKernelNpuOpApi.cpp
    convert_to_int4_pack): values outside [-8, 7] wrap silently, as on the NPU.
    """
    nibbles = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], -1, INT4_PER_INT32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    word = (nibbles << shifts).sum(dim=-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: int32 ``(..., m)`` → int8 ``(..., 8 m)``, sign-extended."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).reshape(*packed.shape[:-1], -1)


def _fp19_round_to_nearest_even(bits: Tensor) -> Tensor:
    """fp32 bits → FP19 rounded to nearest, ties to even, back in fp32 bit positions.

    trans_quant_param_v2.h CalQuantPreScaleValue, round_mode 1: a zero exponent flushes to a
    signed zero, an inf/nan exponent keeps its top mantissa bits, a carry out of the 10-bit
    mantissa bumps the exponent (saturating at inf).
    """
    sign, exponent, mantissa = (bits >> 31) & 1, (bits >> 23) & 0xFF, bits & 0x7FFFFF
    kept = mantissa >> 13
    round_bit, sticky = (mantissa >> 12) & 1, mantissa & 0xFFF
    up = (round_bit != 0) & ((sticky != 0) | ((kept & 1) != 0)) & (exponent != 0) & (exponent != 0xFF)
    kept = kept + up.to(kept.dtype)
    carry = kept >= 1 << 10
    kept = torch.where(carry, torch.zeros_like(kept), kept)
    exponent = exponent + carry.to(exponent.dtype)
    kept = torch.where(exponent > 0xFF, torch.zeros_like(kept), kept)
    exponent = exponent.clamp(max=0xFF)
    fp19 = torch.where(exponent == 0, sign << 18, (sign << 18) | (exponent << 10) | kept)
    return fp19 << 13


def encode_quant_param(scale: Tensor, offset: Tensor | None = None, round_mode: int = 0) -> Tensor:
    """``npu_trans_quant_param``: fp32 scale (and offset) → int64 dequant parameters.

    round_mode 0: ``(f32bits(scale) & 0xFFFFE000) | 1 << 46``, the scale *truncated* to 19 bits
    (1 sign, 8 exponent, 10 mantissa), a relative error below 2**-10, always downwards.
    round_mode 1: the scale rounded to the nearest FP19 (ties to even) first, error <= 2**-11.
    An offset is rounded half to even, clipped to [-256, 255] and stored as 9-bit two's
    complement in bits 37-45.
    """
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    fp19 = bits & _FP19_MASK if not round_mode else _fp19_round_to_nearest_even(bits)
    word = fp19 | _DEQ_FLAG
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
    _require_a2_a3(_DYNAMIC_QUANT)
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
        # aclnnDynamicQuant.md: smoothScales "数据类型要和x保持一致" (the kernels read it as x's dtype)
        torch._check(
            smooth_scales.dtype == input.dtype,
            lambda: f"{_DYNAMIC_QUANT}: smooth_scales dtype {smooth_scales.dtype} must equal input dtype {input.dtype}",
        )
    return dst


def _dynamic_quant_fake(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                        dst_type_max=0.0):  # fmt: skip
    dst = _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    scale = input.new_empty(input.shape[:-1], dtype=torch.float32)
    if dst == torch.quint4x2:
        return input.new_empty((*input.shape[:-1], input.size(-1) // 8), dtype=torch.int32), scale
    return input.new_empty(input.shape, dtype=torch.int8), scale


def dynamic_quant_rows(x: Tensor, qmax: float, scale_form: str) -> tuple[Tensor, Tensor]:
    """The ops-nn kernels' per-row symmetric quantization of fp32 ``x``: ``(codes fp32, scale fp32)``.

    ``q = 127 / rowmax`` (fp32 division), ``codes = rint(x * q)`` (fp32 product, round half to
    even: CAST_RINT); the division ``x / (rowmax / 127)`` of the documented formula "was changed
    to a multiplication" (dynamic_quant_single_row.h), which moves a code by one where
    ``x * q`` and ``x / scale`` round to different sides of a .5. The returned scale is
    ``rowmax * (1/127)`` or ``1 / q`` (:data:`DYNAMIC_QUANT_SCALE_FORMS`). An all-zero row gets
    scale 0 and codes 0 (``q`` is inf there; the 310P kernels set it to 0 explicitly).
    """
    qmax_f = torch.tensor(qmax, dtype=torch.float32)
    rowmax = x.abs().amax(dim=-1)
    q = qmax_f / rowmax
    y = x * q[..., None]
    codes = torch.clamp(torch.round(torch.nan_to_num(y, nan=0.0)), -qmax - 1, qmax)
    if scale_form == "reciprocal":
        scale = 1.0 / q
    else:
        scale = rowmax * (1.0 / qmax_f)
    return codes, scale


def _dynamic_quant_cpu(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                       dst_type_max=0.0):  # fmt: skip
    """The hardware formula of :func:`dynamic_quant_rows` (not the documented ``x / scale``)."""
    dst = _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    x = input.float()
    if smooth_scales is not None:
        x = x * smooth_scales.float()
    qmax = 7.0 if dst == torch.quint4x2 else 127.0
    q, scale = dynamic_quant_rows(x, qmax, _model.dynamic_quant_scale)
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
    limit = quant_matmul_dim_limit(x1.dtype, scale, pertoken_scale)
    torch._check(
        k <= limit and n <= limit,
        lambda: f"{_QUANT_MATMUL}: k={k} and n={n} must not exceed {limit} (last-dim limit of x1 and x2 on "
        f"{_model.chip} for this input combination)",
    )
    if not _a2_a3():
        torch._check(
            pertoken_scale is None and out != _BF16,
            lambda: f"{_QUANT_MATMUL}: {_model.chip} supports neither pertoken_scale nor bfloat16 output",
        )
    _check_nz_operand(x2, k, n, _QUANT_MATMUL, "x2")
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


def quant_matmul_dim_limit(x_dtype: torch.dtype, scale: Tensor, pertoken_scale: Tensor | None) -> int:
    """The last-dim limit the quant_batch_matmul_v3 tiling applies (CheckShapeInBoundary).

    On A2/A3 (DAV_2201) int8 inputs with a 1-D fp32/bf16 ``scale`` and a 1-D ``pertoken_scale``
    are exempt from the 65535 limit (only [1, 2**31-1] remains); everything else keeps it.
    """
    exempt = (
        _a2_a3() and x_dtype == _I8 and scale.dtype in (_F32, _BF16) and scale.dim() == 1
        and pertoken_scale is not None and pertoken_scale.dim() == 1
    )  # fmt: skip
    return MAX_DIM_INT32 if exempt else MAX_LAST_DIM


def _check_nz_operand(w: Tensor, k: int, n: int, op: str, name: str) -> None:
    """FRACTAL_NZ right operands cannot have K or N equal to 1 (aclnn_quant_matmul_v4.cpp, aclnnQuantMatmulV4.md)."""
    if storage_format(w)[0] == ACL_FORMAT_FRACTAL_NZ:
        torch._check(
            k != 1 and n != 1,
            lambda: f"{op}: when the format of {name} is FRACTAL_NZ, its k ({k}) and n ({n}) dimensions can not be 1",
        )


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

    The integer product is exact (fp64 holds any int32 sum exactly); dequantization is fp32,
    ``(acc * scale) * pertoken`` or, with ``emulate(dequant_order="pertoken_opt")``,
    ``acc * (pertoken * scale)`` as the pertoken-opt kernel does; the result is cast to
    ``output_dtype``.
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
    if pertoken_scale is not None and _model.dequant_order == "pertoken_opt":
        y = acc.float() * (pertoken_scale.float()[:, None] * s)
    else:
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
    if not _a2_a3():  # torch_npu-npu_weight_quant_batchmatmul.md, "Atlas 推理系列加速卡产品"
        torch._check(
            x.dtype == _F16 and weight.dtype == _I8,
            lambda: f"{_WQBMM}: {_model.chip} takes float16 x and int8 weight only, got {_name(x.dtype)} x and "
            f"{_name(weight.dtype)} weight",
        )
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
    _check_wqbmm_nz(x, weight, k, n, groups, g)
    return m, k, n, groups


def _check_wqbmm_nz(x: Tensor, weight: Tensor, k: int, n: int, groups: int, g: int) -> None:
    """The FRACTAL_NZ weight rules of A2/A3 (aclnnWeightQuantBatchMatmulV2.md, ConvertWeightToINT4PackKernelNpuOpApi.cpp).

    int4-packed int32 NZ needs C0 = 8 (what ``npu_convert_weight_to_int4pack`` produces from an
    NZ int32 weight; ``npu_format_cast`` of an already packed int32 weight gives C0 = 16);
    per-channel: int8, or int4 with a transposed weight; per-group: int4, weight and x not
    transposed, g in {64, 128}, K % g == 0, N % 64 == 0; K and N not 1. NZ weights are
    valid in graph mode (torchair) only, which the emulator cannot see: the plan keeps them
    out of eager graphs.
    """
    fmt, c0 = storage_format(weight)
    if fmt != ACL_FORMAT_FRACTAL_NZ:
        return
    _check_nz_operand(weight, k, n, _WQBMM, "weight")
    int4 = weight.dtype == _I32
    if int4:
        torch._check(
            c0 == 8,
            lambda: f"{_WQBMM}: an int4-packed int32 FRACTAL_NZ weight must have C0 = 8, got C0 = {c0}: cast the "
            "unpacked int32 weight to FRACTAL_NZ first, then npu_convert_weight_to_int4pack",
        )
    transposed = is_transposed(weight)
    if groups > 0:
        torch._check(
            int4 and not transposed and not is_transposed(x) and g in (64, 128) and k % g == 0 and n % 64 == 0,
            lambda: f"{_WQBMM}: a per-group FRACTAL_NZ weight must be int4, not transposed (nor x), with "
            f"antiquant_group_size 64 or 128, K % g == 0 and N % 64 == 0; got {_name(weight.dtype)}, transposed="
            f"{transposed}, g={g}, K={k}, N={n}",
        )
    elif groups == 0:
        torch._check(
            not int4 or transposed,
            lambda: f"{_WQBMM}: a per-channel int4 FRACTAL_NZ weight must be transposed ((N, K/8).t())",
        )
    else:
        torch._check(False, lambda: f"{_WQBMM}: FRACTAL_NZ weights are not supported with a per-tensor antiquant_scale")


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
    m, k, n, groups = _wqbmm_geometry(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                                      antiquant_group_size, inner_precise, weight_dtype)  # fmt: skip
    if weight.dtype == _I32:
        w = _int_operand(weight, weight.is_contiguous())
    else:
        w = weight
    w = w.float()  # (K, N)
    scale = antiquant_scale.float().reshape(-1, n) if groups != -1 else antiquant_scale.float().reshape(1, 1)
    offset = None if antiquant_offset is None else antiquant_offset.float().reshape(scale.shape)
    route = msd_route(m, k, n, weight, x, groups, antiquant_group_size) if offset is None else None
    if route is not None:
        y = _msd_matmul(x.float(), w, scale, route, antiquant_group_size)
        if bias is not None:
            y = y + bias.float().reshape(1, n)
        return y.to(x.dtype)
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


# The small-M "MSD" kernels (ops-nn weight_quant_batch_matmul_v2_tiling_msd.cpp IsCapable,
# tried first on A2/A3): x is split into integer parts and multiplied with the integer weight
# on the cube unit, instead of anti-quantizing the weight to x's dtype.
MSD_M_LIMIT = 64
MSD_INT8_MAX_K, MSD_INT8_MAX_N = 13696, 32000  # beyond either, per-channel int8 runs the split-K kernel
#: route -> (f1, f2, parts). msd_multicore.h (per-channel int8): a1 = round(x/max * 127.499),
#: a2 = round((x/max - a1 * (1/127.499)) * 2 * 127.499**2). msd_split_k.h / msd_group.h:
#: t = x/max * f1, a1 = round(t), then t = (t - a_i) * f2, a_{i+1} = round(t): int8 127 / 254,
#: two parts; int4 7.49 / 14.98, three parts.
MSD_FACTORS = {
    "perchannel_int8": (127.499, 2 * 127.499, 2),
    "perchannel_int8_splitk": (127.0, 254.0, 2),
    "perchannel_int4": (7.49, 14.98, 3),
    "pergroup_int4": (7.49, 14.98, 3),
}


def msd_route(m: int, k: int, n: int, weight: Tensor, x: Tensor, groups: int, g: int) -> str | None:
    """Which MSD kernel runs (a key of :data:`MSD_FACTORS`), or None.

    weight_quant_batch_matmul_v2_tiling_msd.cpp ``IsCapable``: no x transpose, per-channel or
    per-group; per-channel M <= 64 with K, N multiples of 32 (int4: transposed ND weight,
    N >= 2M); per-group int4 only, weight not transposed, g in {64, 128}, M <= g/8, K % g == 0,
    N % 64 == 0.
    """
    if not (_model.msd and _a2_a3()) or is_transposed(x) or groups < 0:
        return None
    int4 = weight.dtype == _I32
    if groups == 0:
        if m > MSD_M_LIMIT or k % 32 or n % 32:
            return None
        if not int4:
            return "perchannel_int8_splitk" if k > MSD_INT8_MAX_K or n > MSD_INT8_MAX_N else "perchannel_int8"
        nz = storage_format(weight)[0] == ACL_FORMAT_FRACTAL_NZ
        return "perchannel_int4" if is_transposed(weight) and not nz and n >= 2 * m else None
    if int4 and not is_transposed(weight) and g in (64, 128) and m <= g // 8 and k % g == 0 and n % 64 == 0:
        return "pergroup_int4"
    return None


def msd_split(x: Tensor, rowmax: Tensor, route: str) -> list[Tensor]:
    """The integer parts the MSD kernels make of fp32 ``x`` (rows, or row-groups, scaled by ``rowmax``).

    ``CAST_ROUND`` rounds half away from zero; see :data:`MSD_FACTORS` for the formulas.
    """
    f1, f2, count = MSD_FACTORS[route]
    xn = x / rowmax[..., None]
    if route == "perchannel_int8":
        a1 = _round_half_away(xn * f1)
        rest = xn - a1 * torch.tensor(1 / f1, dtype=torch.float32)
        return [a1, _round_half_away(rest * (f1 * f2))]
    t = xn * f1
    parts = [_round_half_away(t)]
    for _ in range(count - 1):
        t = (t - parts[-1]) * f2
        parts.append(_round_half_away(t))
    return parts


def msd_weights(route: str) -> list[float]:
    """What each MSD part's product is divided by: ``x ≈ max * sum(a_i / d_i)``, ``d_i = f1 * f2**i``."""
    f1, f2, count = MSD_FACTORS[route]
    return [f1 * f2**i for i in range(count)]


def _round_half_away(t: Tensor) -> Tensor:
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def _msd_matmul(x: Tensor, w: Tensor, scale: Tensor, route: str, g: int) -> Tensor:
    """``x @ (w * scale)`` through the MSD split: exact integer part products, fp32 recombination."""
    m, k = x.shape
    if route == "pergroup_int4":
        xg = x.reshape(m, k // g, g)
        rowmax = xg.abs().amax(dim=-1)  # (M, G): one max per row and group
        safe = torch.where(rowmax == 0, torch.ones_like(rowmax), rowmax)
        parts = msd_split(xg, safe, route)
        wg = w.reshape(k // g, g, -1)  # (G, g, N)
        y = x.new_zeros(m, w.shape[1])
        for part, f in zip(parts, msd_weights(route)):
            acc = torch.einsum("mgk,gkn->mgn", part.double(), wg.double()).float()  # exact per group
            y = y + (acc * (safe / f)[..., None] * scale[None]).sum(dim=1)
        return y
    rowmax = x.abs().amax(dim=-1)
    safe = torch.where(rowmax == 0, torch.ones_like(rowmax), rowmax)
    y = x.new_zeros(m, w.shape[1])
    for part, f in zip(msd_split(x, safe, route), msd_weights(route)):
        y = y + (part.double() @ w.double()).float() / f
    return y * safe[:, None] * scale.reshape(1, -1)


# --------------------------------------------------------------------------------------------
# weight preparation: int4 pack, trans_quant_param, format_cast
# --------------------------------------------------------------------------------------------
_INT4PACK = "npu_convert_weight_to_int4pack"


def _int4pack_check(weight, inner_k_tiles):
    _require_a2_a3(_INT4PACK)
    torch._check(weight.dtype == _I32, lambda: f"{_INT4PACK}: weight must be int32 holding int4 values, got {weight.dtype}")
    torch._check(weight.dim() == 2, lambda: f"{_INT4PACK}: weight must be 2-D, got {weight.dim()}-D")
    torch._check(weight.is_contiguous(), lambda: f"{_INT4PACK}: weight must be contiguous")
    torch._check(
        weight.size(0) > 0 and weight.size(1) > 0, lambda: f"{_INT4PACK}: weight dim should be greater than 0"
    )
    torch._check(
        weight.size(-1) % INT4_PER_INT32 == 0,
        lambda: f"{_INT4PACK}: the last dim of weight ({weight.size(-1)}) must be divisible by 8",
    )
    torch._check(inner_k_tiles == 0, lambda: f"{_INT4PACK}: inner_k_tiles is reserved and must be 0")


def _int4pack_fake(weight, inner_k_tiles=0):
    _int4pack_check(weight, inner_k_tiles)
    return weight.new_empty((weight.size(0), weight.size(1) // INT4_PER_INT32), dtype=_I32)


def _int4pack_cpu(weight, inner_k_tiles=0):
    """Pack as ConvertWeightToINT4PackKernelNpuOpApi.cpp does: values masked to 4 bits, never range-checked.

    An FRACTAL_NZ input (any C0) is unpacked to ND, packed, and re-laid out as an int32 NZ
    with C0 = 8 (trans_nd_to_nz), which is what the weight-quant kernels read.
    """
    _int4pack_check(weight, inner_k_tiles)
    packed = pack_int4(weight)
    if storage_format(weight)[0] == ACL_FORMAT_FRACTAL_NZ:
        _tag_format(packed, ACL_FORMAT_FRACTAL_NZ, 8)
    return packed


_TRANS = "npu_trans_quant_param"


def _trans_check(scale, offset, round_mode):
    torch._check(
        scale.dim() == 1 or (scale.dim() == 2 and scale.size(0) == 1),
        lambda: "the scale shape support only (1, ) and (1, n)",
    )
    torch._check(scale.dtype == _F32, lambda: f"{_TRANS}: scale must be float32, got {scale.dtype}")
    torch._check(round_mode in (None, 0, 1), lambda: f"round_mode should be 0 or 1, but round_mode is {round_mode}")
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
    return encode_quant_param(s, o, round_mode or 0).reshape(shape)


_FORMAT_CAST = "npu_format_cast"


def _format_cast_check(self, acl_format, customize_dtype, input_dtype):
    torch._check(
        acl_format in ACL_FORMATS,
        lambda: f"{_FORMAT_CAST}: acl_format={acl_format} is not one of {sorted(ACL_FORMATS)}",
    )
    if input_dtype is not None:
        raise _unsupported(_FORMAT_CAST, "input_dtype")
    if customize_dtype is not None:
        # (beta)torch_npu-npu_format_cast.md: customize_dtype=3 (int32) gives an NZ with C0 = 8,
        # on A2/A3 with CANN >= 9.1.0 only; other values are not modelled.
        torch._check(
            _a2_a3() and customize_dtype in (3, _I32),
            lambda: f"{_FORMAT_CAST}: customize_dtype={customize_dtype} is modelled only as 3 (int32, C0 = 8) on A2/A3",
        )


def nz_c0(dtype: torch.dtype, customize_dtype: int | torch.dtype | None = None) -> int:
    """C0 of a FRACTAL_NZ cast: int8 32, other dtypes 16, ``customize_dtype=3`` 8."""
    if customize_dtype is not None:
        return 8
    return _NZ_C0_DEFAULT.get(dtype, 16)


def _format_cast_fake(self, acl_format, *, customize_dtype=None, input_dtype=None):
    _format_cast_check(self, acl_format, customize_dtype, input_dtype)
    return self.new_empty(self.shape)


def _format_cast_cpu(self, acl_format, *, customize_dtype=None, input_dtype=None):
    """Logical values never change with the storage format; the copy is tagged with the format and C0."""
    _format_cast_check(self, acl_format, customize_dtype, input_dtype)
    out = self.clone()
    if acl_format == ACL_FORMAT_FRACTAL_NZ:
        _tag_format(out, acl_format, nz_c0(self.dtype, customize_dtype))
    return out


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
