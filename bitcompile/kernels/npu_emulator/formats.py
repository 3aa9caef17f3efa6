"""Weight preparation ops: ``npu_convert_weight_to_int4pack``, ``npu_trans_quant_param``, ``npu_format_cast``."""

from __future__ import annotations

import torch

from bitcompile.kernels.npu_emulator.model import (
    ACL_FORMATS,
    INT4_PER_INT32,
    NZ_C0_DEFAULT,
    encode_quant_param,
    is_a2_a3,
    pack_int4,
    require_a2_a3,
    storage_format,
    tag_format,
    unsupported,
)
from bitcompile.kernels.npu_ops import ACL_FORMAT_FRACTAL_NZ

_F32, _BF16, _F16, _I8, _I32, _I64 = torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64

# --------------------------------------------------------------------------------------------
# weight preparation: int4 pack, trans_quant_param, format_cast
# --------------------------------------------------------------------------------------------
_INT4PACK = "npu_convert_weight_to_int4pack"


def _int4pack_check(weight, inner_k_tiles):
    require_a2_a3(_INT4PACK)
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
        tag_format(packed, ACL_FORMAT_FRACTAL_NZ, 8)
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
        raise unsupported(_FORMAT_CAST, "input_dtype")
    if customize_dtype is not None:
        # (beta)torch_npu-npu_format_cast.md: customize_dtype=3 (int32) gives an NZ with C0 = 8,
        # on A2/A3 with CANN >= 9.1.0 only; other values are not modelled.
        torch._check(
            is_a2_a3() and customize_dtype in (3, _I32),
            lambda: f"{_FORMAT_CAST}: customize_dtype={customize_dtype} is modelled only as 3 (int32, C0 = 8) on A2/A3",
        )


def nz_c0(dtype: torch.dtype, customize_dtype: int | torch.dtype | None = None) -> int:
    """C0 of a FRACTAL_NZ cast: int8 32, other dtypes 16, ``customize_dtype=3`` 8."""
    if customize_dtype is not None:
        return 8
    return NZ_C0_DEFAULT.get(dtype, 16)


def _format_cast_fake(self, acl_format, *, customize_dtype=None, input_dtype=None):
    _format_cast_check(self, acl_format, customize_dtype, input_dtype)
    return self.new_empty(self.shape)


def _format_cast_cpu(self, acl_format, *, customize_dtype=None, input_dtype=None):
    """Logical values never change with the storage format; the copy is tagged with the format and C0."""
    _format_cast_check(self, acl_format, customize_dtype, input_dtype)
    out = self.clone()
    if acl_format == ACL_FORMAT_FRACTAL_NZ:
        tag_format(out, acl_format, nz_c0(self.dtype, customize_dtype))
    return out


#: op name -> (CPU kernel, fake impl), registered by npu_ops.ensure_npu_ops
IMPLS = {
    "npu_convert_weight_to_int4pack": (_int4pack_cpu, _int4pack_fake),
    "npu_trans_quant_param": (_trans_cpu, _trans_fake),
    "npu_format_cast": (_format_cast_cpu, _format_cast_fake),
}
