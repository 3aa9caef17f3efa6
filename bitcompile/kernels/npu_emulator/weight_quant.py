"""``npu_weight_quant_batchmatmul``: checks, fake impl and CPU kernel, with the small-M "MSD" split."""

from __future__ import annotations

import torch
from torch import Tensor

from bitcompile.kernels.npu_emulator.model import (
    INT4_PER_INT32,
    MAX_LAST_DIM,
    as_dtype,
    check_layout,
    current_model,
    is_a2_a3,
    is_transposed,
    storage_format,
    unsupported,
)
from bitcompile.kernels.npu_emulator.quant import check_nz_operand, dtype_name, int_operand
from bitcompile.kernels.npu_ops import ACL_FORMAT_FRACTAL_NZ

_F32, _BF16, _F16, _I8, _I32, _I64 = torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64

# --------------------------------------------------------------------------------------------
# npu_weight_quant_batchmatmul
# --------------------------------------------------------------------------------------------
_WQBMM = "npu_weight_quant_batchmatmul"


def _wqbmm_geometry(x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset, bias,
                    antiquant_group_size, inner_precise, weight_dtype):  # fmt: skip
    """Check the documented constraints; return (m, k, n, group_count or 0 / -1 for per-tensor/per-channel)."""
    if quant_scale is not None or quant_offset is not None:
        raise unsupported(_WQBMM, "quant_scale / quant_offset (int8 output)")
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
    check_layout(x, "x", _WQBMM)
    check_layout(weight, "weight", _WQBMM)
    if not is_a2_a3():  # torch_npu-npu_weight_quant_batchmatmul.md, "Atlas 推理系列加速卡产品"
        torch._check(
            x.dtype == _F16 and weight.dtype == _I8,
            lambda: f"{_WQBMM}: {current_model().chip} takes float16 x and int8 weight only, got {dtype_name(x.dtype)} x and "
            f"{dtype_name(weight.dtype)} weight",
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
        raise unsupported(_WQBMM, "int64 antiquant_scale (fp16 x, int8 transposed weight, M <= 96 special path)")
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
            lambda: f"{_WQBMM}: bias must be {dtype_name(want)} for {dtype_name(x.dtype)} x, got {dtype_name(bias.dtype)}",
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
    check_nz_operand(weight, k, n, _WQBMM, "weight")
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
            f"antiquant_group_size 64 or 128, K % g == 0 and N % 64 == 0; got {dtype_name(weight.dtype)}, transposed="
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
        w = int_operand(weight, weight.is_contiguous())
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
    if not (current_model().msd and is_a2_a3()) or is_transposed(x) or groups < 0:
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


#: op name -> (CPU kernel, fake impl), registered by npu_ops.ensure_npu_ops
IMPLS = {
    "npu_weight_quant_batchmatmul": (_wqbmm_cpu, _wqbmm_fake),
}
