"""The emulator's model of the hardware: settings per chip / kernel variant, dtype enums, the
FRACTAL_NZ storage tag, int4 packing and the int64 scale encoding of ``npu_trans_quant_param``."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

from bitcompile.kernels.npu_ops import ACL_FORMAT_ND



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


def is_a2_a3() -> bool:
    return _model.chip in ("A2", "A3")


def require_a2_a3(op: str) -> None:
    if not is_a2_a3():
        raise RuntimeError(f"{op} is documented for Atlas A2/A3 only, not {_model.chip} (see docs/cann.md)")


# --------------------------------------------------------------------------------------------
# storage format tags (FRACTAL_NZ and its C0)
# --------------------------------------------------------------------------------------------
# On an NPU a tensor carries its storage format; a CPU tensor cannot, so the emulator keeps a
# tag per storage (keyed by its data pointer, dropped when the tagged tensor dies). Views of
# a tagged tensor (a .t()) share the tag, as on the NPU.
NZ_C0_DEFAULT = {torch.int8: 32, torch.uint8: 32}  # int32 / fp32 / fp16 / bf16: 16 (npu_format_cast doc)
_format_tags: dict[int, tuple[int, int, int]] = {}  # storage data_ptr -> (format, c0, token)
_tokens = itertools.count()


def _storage_key(t: Tensor) -> int | None:
    if t.device.type != "cpu" or isinstance(t, torch._subclasses.FakeTensor) or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


def _drop_tag(key: int, token: int) -> None:
    if _format_tags.get(key, (0, 0, -1))[2] == token:
        del _format_tags[key]


def tag_format(t: Tensor, acl_format: int, c0: int) -> Tensor:
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


def check_layout(t: Tensor, name: str, op: str) -> None:
    torch._check(
        t.is_contiguous() or is_transposed(t),
        lambda: f"{op}: {name} must be contiguous or a transpose of its last two dims, got strides {tuple(t.stride())}",
    )


def unsupported(op: str, what: str) -> NotImplementedError:
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


