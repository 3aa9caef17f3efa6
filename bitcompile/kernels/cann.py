"""Kernels for ``target="cann"``: the ``bitcpm`` op's math through ``torch.ops.npu.*``.

The same functions run against the real torch_npu on an Ascend NPU and against
:mod:`bitcompile.kernels.npu_emulator` on CPU (importing this module calls
:func:`~bitcompile.kernels.npu_emulator.ensure_npu_ops`). DESIGN.md §5 maps the numerics:

* W1.58A8 with one weight scale per row (or per tensor): ``npu_dynamic_quant`` on the
  flattened ``(M, K)`` activations, then ``npu_quant_matmul(q_x, q_w (K, N), s_w (N,),
  pertoken_scale=s_x (M,), bias, output_dtype=bf16 | fp16)``; int32 accumulation is exact.
* Per-group weight scales (g a multiple of 32) or weight-only: ``npu_weight_quant_batchmatmul``
  with the int8 codes ``(K, N)`` (int4-packed at pack time for inference) and
  ``antiquant_scale`` ``(ceil(K/g), N)``. With int8 activations the activations are
  quantized by ``npu_dynamic_quant`` and dequantized first, so the model sees the same
  activation quantization it was trained with.

The Ascend quantized matmuls take fp16/bf16 activations and produce fp16/bf16: an fp32 model
is computed in bf16 and cast back. Weight quantization and the fused STE backward are
bitcompile's own pure-PyTorch code (the npu ops are inference-only and have no autograd).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.contents import contents_of
from bitcompile.kernels.groups import PER_TENSOR
from bitcompile.kernels.npu_emulator import MAX_LAST_DIM, ensure_npu_ops

PROVIDER = ensure_npu_ops()

_HALF = (torch.float16, torch.bfloat16)

quantize_weight = reference.quantize_weight
dequantize_weight = reference.dequantize_weight
# The fused straight-through backward stays ours: torch_npu's quantized ops have no autograd.
ternary_linear_backward = reference.ternary_linear_backward


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the Ascend kernels run in: fp16/bf16 as given, anything else bf16."""
    return dtype if dtype in _HALF else torch.bfloat16


def unsupported_reason(
    in_features: int, out_features: int, group_code: int, dtype: torch.dtype
) -> str | None:
    """Why a layer cannot use the torch_npu quantized kernels (None when it can)."""
    if in_features > MAX_LAST_DIM or out_features > MAX_LAST_DIM:
        return f"{out_features}x{in_features} exceeds the {MAX_LAST_DIM} last-dim limit of the torch_npu quantized matmuls"
    if dtype not in (torch.float32, *_HALF):
        return f"input dtype {str(dtype).removeprefix('torch.')} has no torch_npu quantized matmul"
    if 0 < group_code < in_features and group_code % 32:
        return f"group size {group_code} is not a multiple of 32 (npu_weight_quant_batchmatmul antiquant_group_size)"
    return None


def uses_quant_matmul(n_groups: int, quantize_activations: bool) -> bool:
    """W1.58A8 with a single scale column goes to npu_quant_matmul; the rest to npu_weight_quant_batchmatmul."""
    return quantize_activations and n_groups == 1


def _check(x_codes_or_x: Tensor, w_codes: Tensor, group_code: int) -> None:
    n, k = w_codes.shape
    reason = unsupported_reason(k, n, group_code, x_codes_or_x.dtype if x_codes_or_x.is_floating_point() else torch.float32)
    if reason is not None:
        raise ValueError(f"bitcpm kernel 'cann': {reason}; use kernel 'reference' for this layer")


def quantize_activations(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 through ``npu_dynamic_quant``: ``codes`` int8 ``(M, K)``, ``scales`` fp32 ``(M,)``."""
    return torch.ops.npu.npu_dynamic_quant(x2d.to(compute_dtype(x2d.dtype)))


def _bias_for_quant_matmul(bias: Tensor | None, out: torch.dtype) -> Tensor | None:
    # bf16 bias needs bf16 output, fp16 bias fp16 output; fp32 bias is accepted by both.
    if bias is None or bias.dtype in (torch.float32, out):
        return bias
    return bias.float()


def _bias_for_weight_quant(bias: Tensor | None, x_dtype: torch.dtype) -> Tensor | None:
    # npu_weight_quant_batchmatmul: fp16 bias for fp16 x, fp32 bias for bf16 x.
    if bias is None:
        return None
    return bias.to(torch.float16 if x_dtype == torch.float16 else torch.float32)


def antiquant_scale(w_scales: Tensor, group_code: int, dtype: torch.dtype) -> tuple[Tensor, int]:
    """``(N, n_groups)`` scales → ``antiquant_scale`` and ``antiquant_group_size`` for npu_weight_quant_batchmatmul."""
    if w_scales.shape[1] > 1:
        return w_scales.t().contiguous().to(dtype), group_code
    if group_code == PER_TENSOR:
        return w_scales[:1, 0].to(dtype), 0
    return w_scales[:, 0].to(dtype), 0


def quant_matmul(
    x_codes: Tensor, x_scales: Tensor, w_kn: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """``npu_quant_matmul`` with a ``(K, N)`` int8 weight (a transposed view or a packed contiguous copy)."""
    out = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
    scale = w_scales[:1, 0] if group_code == PER_TENSOR else w_scales.reshape(-1)
    y = torch.ops.npu.npu_quant_matmul(
        x_codes, w_kn, scale, pertoken_scale=x_scales, bias=_bias_for_quant_matmul(bias, out), output_dtype=out
    )
    return y.to(out_dtype)


def weight_quant_matmul(
    x2d: Tensor, w_kn: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``npu_weight_quant_batchmatmul`` with an int8 ``(K, N)`` or int4-packed int32 ``(K, N/8)`` weight."""
    x = x2d.to(compute_dtype(x2d.dtype))
    scale, group = antiquant_scale(w_scales, group_code, x.dtype)
    y = torch.ops.npu.npu_weight_quant_batchmatmul(
        x, w_kn, scale, bias=_bias_for_weight_quant(bias, x.dtype), antiquant_group_size=group
    )
    return y.to(out_dtype)


def int8_ternary_matmul(
    x_codes: Tensor, x_scales: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """W1.58A8 forward (see the module docstring for which torch_npu op runs)."""
    _check(x_scales, w_codes, group_code)
    if uses_quant_matmul(w_scales.shape[1], True):
        return quant_matmul(x_codes, x_scales, w_codes.t(), w_scales, group_code, bias, out_dtype)
    x = (x_codes.float() * x_scales[:, None]).to(compute_dtype(out_dtype))
    return weight_quant_matmul(x, w_codes.t(), w_scales, group_code, bias, out_dtype)


def float_ternary_matmul(
    x2d: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """Weight-only forward through ``npu_weight_quant_batchmatmul`` (int8 codes, transposed view)."""
    _check(x2d, w_codes, group_code)
    return weight_quant_matmul(x2d, w_codes.t(), w_scales, group_code, bias, out_dtype)


# ---- packed inference: weights prepared once, outside any graph ----


def prepare_weight(
    codes: Tensor, w_scales: Tensor, group_code: int, quantize_activations: bool, dtype: torch.dtype
) -> dict[str, Tensor | int | str]:
    """Ascend-ready tensors for one ternary layer, built once at pack/freeze time.

    ``codes`` int8 ``(N, K)`` in {-1, 0, 1}, ``w_scales`` fp32 ``(N, n_groups)``, ``dtype`` the
    model's activation dtype. Returns ``{"path", "weight", "scale", "group"}``:

    * ``path="quant_matmul"``: ``weight`` int8 ``(K, N)`` contiguous (the non-transposed layout
      A2/A3 recommend before FRACTAL_NZ), ``scale`` fp32 ``(N,)`` or ``(1,)``;
    * ``path="weight_quant_batchmatmul"``: ``weight`` int4-packed int32 ``(K, N/8)`` via
      ``npu_convert_weight_to_int4pack`` when N is a multiple of 8 (int8 ``(K, N)`` otherwise),
      ``scale`` the ``antiquant_scale`` in the compute dtype, ``group`` its group size.

    On a real NPU the weight is also cast to FRACTAL_NZ (``npu_format_cast(w, 29)``); on CPU
    the emulator keeps ND storage.
    """
    n, k = codes.shape
    reason = unsupported_reason(k, n, group_code, dtype)
    if reason is not None:
        raise ValueError(f"bitcpm kernel 'cann': {reason}")
    w_kn = codes.to(torch.int8).t().contiguous()
    if uses_quant_matmul(w_scales.shape[1], quantize_activations):
        scale = w_scales[:1, 0] if group_code == PER_TENSOR else w_scales[:, 0]
        prepared = {"path": "quant_matmul", "weight": w_kn, "scale": scale.float().contiguous(), "group": group_code}
    else:
        if n % 8 == 0:
            w_kn = torch.ops.npu.npu_convert_weight_to_int4pack(w_kn.to(torch.int32))
        scale, group = antiquant_scale(w_scales, group_code, compute_dtype(dtype))
        prepared = {"path": "weight_quant_batchmatmul", "weight": w_kn, "scale": scale, "group": group}
    if codes.device.type == "npu":
        prepared["weight"] = torch.ops.npu.npu_format_cast(prepared["weight"], 29)
    return prepared


def prepared_linear(
    x: Tensor, prepared: dict, bias: Tensor | None, quantize_activations: bool, out_features: int
) -> Tensor:
    """Forward of a layer prepared by :func:`prepare_weight`: ``x (..., K)`` → ``(..., N)``."""
    x2d = x.reshape(-1, x.shape[-1])
    if prepared["path"] == "quant_matmul":
        q, s = quantize_activations_(x2d)
        y = torch.ops.npu.npu_quant_matmul(
            q, prepared["weight"], prepared["scale"], pertoken_scale=s,
            bias=_bias_for_quant_matmul(bias, _out_dtype(x.dtype)), output_dtype=_out_dtype(x.dtype),
        )  # fmt: skip
    else:
        xc = x2d.to(compute_dtype(x.dtype))
        if quantize_activations:
            q, s = quantize_activations_(x2d)
            xc = (q.float() * s[:, None]).to(xc.dtype)
        y = torch.ops.npu.npu_weight_quant_batchmatmul(
            xc, prepared["weight"], prepared["scale"], bias=_bias_for_weight_quant(bias, xc.dtype),
            antiquant_group_size=prepared["group"],
        )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def describe_prepared(prepared: dict) -> str:
    """The prepared weight's layout, e.g. ``int8 (K, N) = 96x40`` (for the explain report)."""
    weight = prepared["weight"]
    k, cols = weight.shape
    if weight.dtype == torch.int32:
        return f"int4-packed int32 (K, N/8) = {k}x{cols}"
    return f"int8 (K, N) = {k}x{cols}"


def _state(tensor: Tensor) -> tuple:
    """Version and contents generation (kernels.contents: writes the version counter misses)."""
    contents = contents_of(tensor)
    return None if tensor.is_inference() else tensor._version, contents, contents.generation


# (id(packed), id(scales), in_features, group, quantize_activations, dtype) ->
#   (weakref packed, its state, weakref scales, its state, path, group, weakref weight, weakref scale)
_prepared_cache: dict[tuple, tuple] = {}


def prepare_packed(
    packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, quantize_activations: bool,
    dtype: torch.dtype,
) -> dict[str, Tensor | int | str]:  # fmt: skip
    """:func:`prepare_weight` for a ``PackedTernaryLinear``'s buffers: the 2-bit codes are unpacked here, once.

    Called by the compile step (``passes.lower_cann.prepare_packed_layers``), never inside a
    graph. Graphs compiled from the same packed buffers (prefill and decode shapes, a
    recompile) share one set of prepared tensors while any of them is alive: the cache holds
    them weakly and checks that ``packed``/``scales`` are the same tensors at the same
    version counters, with the same contents (:mod:`bitcompile.kernels.contents`).
    """
    from bitcompile.kernels.packing import check_packed_args, unpack_codes

    key = (id(packed), id(w_scales), in_features, group_code, bool(quantize_activations), dtype)
    entry = _prepared_cache.get(key)
    if entry is not None:
        packed_ref, packed_version, scales_ref, scales_version, path, group, weight_ref, scale_ref = entry
        weight, scale = weight_ref(), scale_ref()
        if (
            packed_ref() is packed and scales_ref() is w_scales and weight is not None and scale is not None
            and _state(packed) == packed_version and _state(w_scales) == scales_version
        ):  # fmt: skip
            return {"path": path, "weight": weight, "scale": scale, "group": group}
    x_like = torch.empty(0, in_features, dtype=dtype if dtype.is_floating_point else torch.float32)
    check_packed_args("prepare_packed", x_like, packed, w_scales, in_features, group_code, None)
    codes = unpack_codes(packed, in_features)
    prepared = prepare_weight(codes, w_scales.float(), group_code, quantize_activations, dtype)
    for stale in [k for k, e in _prepared_cache.items() if e[0]() is None or e[6]() is None]:
        del _prepared_cache[stale]
    _prepared_cache[key] = (
        weakref.ref(packed), _state(packed), weakref.ref(w_scales), _state(w_scales),
        prepared["path"], prepared["group"], weakref.ref(prepared["weight"]), weakref.ref(prepared["scale"]),
    )  # fmt: skip
    return prepared


quantize_activations_ = quantize_activations


def packed_int8_matmul(
    x_codes: Tensor, x_scales: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int,
    bias: Tensor | None, out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """``bitcpm::ternary_linear_packed`` on target cann: unpack the canonical 2-bit codes, then :func:`int8_ternary_matmul`.

    This is the op's eager kernel and unpacks per call (one pass over the weight). Compiled
    with ``target="cann"``, a packed model never reaches it: the compile step replaces the op
    by :func:`prepared_linear` on weights :func:`prepare_packed` built once.
    """
    from bitcompile.kernels.packing import unpack_codes

    return int8_ternary_matmul(x_codes, x_scales, unpack_codes(packed, in_features), w_scales, group_code, bias, out_dtype)


def packed_float_matmul(
    x2d: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """Weight-only ``bitcpm::ternary_linear_packed`` on target cann (eager: unpacks per call, see above)."""
    from bitcompile.kernels.packing import unpack_codes

    return float_ternary_matmul(x2d, unpack_codes(packed, in_features), w_scales, group_code, bias, out_dtype)


def packed_linear(
    x2d: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None,
    quantize_activations: bool, out_dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """Serving forward from float activations on target cann (the kernel-module interface's fused entry)."""
    if not quantize_activations:
        return packed_float_matmul(x2d, packed, w_scales, in_features, group_code, bias, out_dtype)
    x_codes, x_scales = quantize_activations_(x2d)
    return packed_int8_matmul(x_codes, x_scales, packed, w_scales, in_features, group_code, bias, out_dtype)
