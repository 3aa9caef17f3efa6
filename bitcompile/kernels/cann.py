"""Kernels for ``target="cann"``: the ``bitcpm`` op's math through ``torch.ops.npu.*``.

The same functions run against the real torch_npu on an Ascend NPU and against
:mod:`bitcompile.kernels.npu_emulator` on CPU (importing this module calls
:func:`~bitcompile.kernels.npu_ops.ensure_npu_ops`). What runs per layer is the
:class:`~bitcompile.kernels.cann_plan.LayerPlan` of the chip (``chip=None``: ``"auto"``):

* W1.58A8 with one weight scale per row (or per tensor) on A2/A3: ``npu_dynamic_quant`` on
  the flattened ``(M, K)`` activations, then ``npu_quant_matmul(q_x, q_w (K, N), s_w (N,),
  pertoken_scale=s_x (M,), bias, output_dtype=bf16 | fp16)``; int32 accumulation is exact.
* Per-group weight scales (g a multiple of 32), weight-only, and every layer on 310P:
  ``npu_weight_quant_batchmatmul`` with the int8 codes ``(K, N)`` (int4-packed at pack time
  on A2/A3) and ``antiquant_scale`` ``(ceil(K/g), N)``. With int8 activations the activations
  are quantized (``npu_dynamic_quant``; aten ops on 310P) and dequantized first, so the model
  sees the same activation quantization it was trained with.

The Ascend quantized matmuls take fp16/bf16 activations (fp16 only on 310P) and produce the
same: an fp32 model is computed in bf16 and cast back. Weight quantization and the fused STE
backward are bitcompile's own pure-PyTorch code (the npu ops are inference-only and have no
autograd).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.cann_plan import LayerPlan, plan_layer, resolve_chip
from bitcompile.kernels.cann_plan import compute_dtype as _plan_compute_dtype
from bitcompile.kernels.contents import contents_of
from bitcompile.kernels.groups import PER_TENSOR
from bitcompile.kernels.npu_ops import ACL_FORMAT_FRACTAL_NZ, ensure_npu_ops

PROVIDER = ensure_npu_ops()

quantize_weight = reference.quantize_weight
dequantize_weight = reference.dequantize_weight
# The fused straight-through backward stays ours: torch_npu's quantized ops have no autograd.
ternary_linear_backward = reference.ternary_linear_backward
BACKWARD_PRECISIONS = reference.BACKWARD_PRECISIONS

_default_chip: str | None = None


def default_chip() -> str:
    """The chip ``chip=None`` means: the NPU's (``torch_npu.npu.get_device_name()``), ``"A2"`` on the emulator."""
    global _default_chip
    if _default_chip is None:
        _default_chip = resolve_chip("auto")
    return _default_chip


def _chip(chip: str | None) -> str:
    return default_chip() if chip is None else chip


def compute_dtype(dtype: torch.dtype, chip: str | None = None) -> torch.dtype:
    """The activation dtype the Ascend kernels run in: fp16/bf16 as given (fp32 → bf16); fp16 on 310P."""
    return _plan_compute_dtype(dtype, _chip(chip))


def layer_plan(
    in_features: int, out_features: int, group_code: int, quantize_activations: bool, dtype: torch.dtype,
    chip: str | None = None, *, nz: bool = False, graph_mode: bool = False,
) -> LayerPlan | str:  # fmt: skip
    """:func:`~bitcompile.kernels.cann_plan.plan_layer` with the default chip."""
    return plan_layer(in_features, out_features, group_code, quantize_activations, dtype, _chip(chip), nz=nz,
                      graph_mode=graph_mode)  # fmt: skip


def unsupported_reason(
    in_features: int, out_features: int, group_code: int, dtype: torch.dtype, quantize_activations: bool = True,
    chip: str | None = None,
) -> str | None:  # fmt: skip
    """Why a layer cannot use the torch_npu quantized kernels (None when it can)."""
    plan = layer_plan(in_features, out_features, group_code, quantize_activations, dtype, chip)
    return plan if isinstance(plan, str) else None


def uses_quant_matmul(n_groups: int, quantize_activations: bool, chip: str | None = None) -> bool:
    """A2/A3 W1.58A8 with a single scale column goes to npu_quant_matmul; the rest to npu_weight_quant_batchmatmul."""
    return quantize_activations and n_groups == 1 and _chip(chip) != "310P"


def _check(x_codes_or_x: Tensor, w_codes: Tensor, group_code: int, quantize_activations: bool, chip: str) -> None:
    n, k = w_codes.shape
    dtype = x_codes_or_x.dtype if x_codes_or_x.is_floating_point() else torch.float32
    reason = unsupported_reason(k, n, group_code, dtype, quantize_activations, chip)
    if reason is not None:
        raise ValueError(f"bitcpm kernel 'cann': {reason}; use kernel 'reference' for this layer")


def quantize_activations(x2d: Tensor, chip: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-token int8: ``codes`` int8 ``(M, K)``, ``scales`` fp32 ``(M,)``.

    ``npu_dynamic_quant`` on A2/A3 (it multiplies by ``127/rowmax``: a code can differ by one
    from the reference quantizer, docs/cann.md "Numerics"); bitcompile's aten quantizer on 310P,
    where torch_npu documents no ``npu_dynamic_quant``.
    """
    chip = _chip(chip)
    if chip == "310P":
        return reference.quantize_activations(x2d)
    return torch.ops.npu.npu_dynamic_quant(x2d.to(compute_dtype(x2d.dtype, chip)))


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
    x2d: Tensor, w_kn: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None, out_dtype: torch.dtype,
    chip: str | None = None,
) -> Tensor:  # fmt: skip
    """``npu_weight_quant_batchmatmul`` with an int8 ``(K, N)`` or int4-packed int32 weight."""
    x = x2d.to(compute_dtype(x2d.dtype, chip))
    scale, group = antiquant_scale(w_scales, group_code, x.dtype)
    y = torch.ops.npu.npu_weight_quant_batchmatmul(
        x, w_kn, scale, bias=_bias_for_weight_quant(bias, x.dtype), antiquant_group_size=group
    )
    return y.to(out_dtype)


def int8_ternary_matmul(
    x_codes: Tensor, x_scales: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None,
    out_dtype: torch.dtype, chip: str | None = None,
) -> Tensor:  # fmt: skip
    """W1.58A8 forward (see the module docstring for which torch_npu op runs)."""
    chip = _chip(chip)
    _check(x_scales, w_codes, group_code, True, chip)
    if uses_quant_matmul(w_scales.shape[1], True, chip):
        return quant_matmul(x_codes, x_scales, w_codes.t(), w_scales, group_code, bias, out_dtype)
    x = (x_codes.float() * x_scales[:, None]).to(compute_dtype(out_dtype, chip))
    return weight_quant_matmul(x, w_codes.t(), w_scales, group_code, bias, out_dtype, chip)


def float_ternary_matmul(
    x2d: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None, out_dtype: torch.dtype,
    chip: str | None = None,
) -> Tensor:  # fmt: skip
    """Weight-only forward through ``npu_weight_quant_batchmatmul`` (int8 codes, transposed view)."""
    chip = _chip(chip)
    _check(x2d, w_codes, group_code, False, chip)
    return weight_quant_matmul(x2d, w_codes.t(), w_scales, group_code, bias, out_dtype, chip)


# ---- packed inference: weights prepared once, outside any graph ----


def _nz(weight: Tensor) -> Tensor:
    return torch.ops.npu.npu_format_cast(weight, ACL_FORMAT_FRACTAL_NZ)


def _prepared_weight(codes: Tensor, plan: LayerPlan) -> Tensor:
    """The weight tensor of ``plan`` from int8 codes ``(N, K)``.

    int4 FRACTAL_NZ: the *unpacked* int32 weight is cast to NZ first and then packed, which
    gives the C0 = 8 layout the weight-quant kernels read (ConvertWeightToINT4PackKernelNpuOpApi.cpp;
    packing first and casting the int32 words gives C0 = 16, wrong numbers on hardware).
    """
    int8_nk = codes.to(torch.int8)
    if plan.weight_dtype == "int8":
        weight = int8_nk.t().contiguous()  # (K, N): the non-transposed layout A2/A3 recommend before NZ
        return _nz(weight) if plan.weight_nz else weight
    base = int8_nk.to(torch.int32).contiguous() if plan.weight_transposed else int8_nk.t().contiguous().to(torch.int32)
    if plan.weight_nz:
        base = _nz(base)
    packed = torch.ops.npu.npu_convert_weight_to_int4pack(base)
    return packed.t() if plan.weight_transposed else packed


def prepare_weight(
    codes: Tensor, w_scales: Tensor, group_code: int, quantize_activations: bool, dtype: torch.dtype,
    chip: str | None = None, *, nz: bool | None = None, graph_mode: bool = False,
) -> dict[str, Tensor | int | str]:  # fmt: skip
    """Ascend-ready tensors for one ternary layer, built once at pack/freeze time.

    ``codes`` int8 ``(N, K)`` in {-1, 0, 1}, ``w_scales`` fp32 ``(N, n_groups)``, ``dtype`` the
    model's activation dtype, ``chip`` the plan's chip, ``nz`` whether FRACTAL_NZ storage exists
    (default: ``codes`` is on an NPU), ``graph_mode`` whether the graph goes to torchair.
    Returns ``{"path", "weight", "scale", "group", "chip", "layout"}``:

    * ``path="quant_matmul"``: ``weight`` int8 ``(K, N)``, ``scale`` fp32 ``(N,)`` or ``(1,)``;
    * ``path="weight_quant_batchmatmul"``: ``weight`` int4-packed int32 ``(N, K/8).t()`` or
      ``(K, N/8)``, or int8 ``(K, N)`` (see :func:`~bitcompile.kernels.cann_plan.plan_layer`),
      ``scale`` the ``antiquant_scale`` in the compute dtype, ``group`` its group size.

    ``layout`` is the plan's description for the explain report.
    """
    n, k = codes.shape
    nz = codes.device.type == "npu" if nz is None else nz
    plan = layer_plan(k, n, group_code, quantize_activations, dtype, chip, nz=nz, graph_mode=graph_mode)
    if isinstance(plan, str):
        raise ValueError(f"bitcpm kernel 'cann': {plan}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("bitcpm kernel 'cann': prepare_weight takes ternary codes in {-1, 0, 1}")
    weight = _prepared_weight(codes, plan)
    if plan.path == "quant_matmul":
        scale, group = (w_scales[:1, 0] if group_code == PER_TENSOR else w_scales[:, 0]).float().contiguous(), group_code
    else:
        scale, group = antiquant_scale(w_scales, group_code, plan.compute_dtype)
    return {"path": plan.path, "weight": weight, "scale": scale, "group": group, "chip": plan.chip,
            "layout": plan.describe(tuple(weight.shape))}  # fmt: skip


def prepared_linear(
    x: Tensor, prepared: dict, bias: Tensor | None, quantize_activations: bool, out_features: int
) -> Tensor:
    """Forward of a layer prepared by :func:`prepare_weight`: ``x (..., K)`` → ``(..., N)``."""
    chip = prepared.get("chip")
    x2d = x.reshape(-1, x.shape[-1])
    if prepared["path"] == "quant_matmul":
        q, s = quantize_activations_(x2d, chip)
        y = torch.ops.npu.npu_quant_matmul(
            q, prepared["weight"], prepared["scale"], pertoken_scale=s,
            bias=_bias_for_quant_matmul(bias, _out_dtype(x.dtype)), output_dtype=_out_dtype(x.dtype),
        )  # fmt: skip
    else:
        xc = x2d.to(compute_dtype(x.dtype, chip))
        if quantize_activations:
            q, s = quantize_activations_(x2d, chip)
            xc = (q.float() * s[:, None]).to(xc.dtype)
        y = torch.ops.npu.npu_weight_quant_batchmatmul(
            xc, prepared["weight"], prepared["scale"], bias=_bias_for_weight_quant(bias, xc.dtype),
            antiquant_group_size=prepared["group"],
        )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def describe_prepared(prepared: dict) -> str:
    """The prepared layer's plan, e.g. ``Ascend A2: npu_dynamic_quant -> npu_quant_matmul, int8 (K, N) ND = 96x40``."""
    return str(prepared["layout"])


def _state(tensor: Tensor) -> tuple:
    """Version and contents generation (kernels.contents: writes the version counter misses)."""
    contents = contents_of(tensor)
    return None if tensor.is_inference() else tensor._version, contents, contents.generation


# (id(packed), id(scales), in_features, group, quantize_activations, dtype, chip, nz, graph_mode) ->
#   (weakref packed, its state, weakref scales, its state, static fields, weakref weight, weakref scale)
_prepared_cache: dict[tuple, tuple] = {}
_STATIC_FIELDS = ("path", "group", "chip", "layout")


def prepare_packed(
    packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, quantize_activations: bool,
    dtype: torch.dtype, chip: str | None = None, *, nz: bool | None = None, graph_mode: bool = False,
) -> dict[str, Tensor | int | str]:  # fmt: skip
    """:func:`prepare_weight` for a ``PackedTernaryLinear``'s buffers: the 2-bit codes are unpacked here, once.

    Called by the compile step (``passes.lower_cann.prepare_packed_layers``), never inside a
    graph. Graphs compiled from the same packed buffers (prefill and decode shapes, a
    recompile) share one set of prepared tensors while any of them is alive: the cache holds
    them weakly and checks that ``packed``/``scales`` are the same tensors at the same
    version counters, with the same contents (:mod:`bitcompile.kernels.contents`).
    """
    from bitcompile.kernels.packing import check_packed_args, unpack_codes

    chip = _chip(chip)
    nz = packed.device.type == "npu" if nz is None else nz
    key = (id(packed), id(w_scales), in_features, group_code, bool(quantize_activations), dtype, chip, nz, graph_mode)
    entry = _prepared_cache.get(key)
    if entry is not None:
        packed_ref, packed_version, scales_ref, scales_version, static, weight_ref, scale_ref = entry
        weight, scale = weight_ref(), scale_ref()
        if (
            packed_ref() is packed and scales_ref() is w_scales and weight is not None and scale is not None
            and _state(packed) == packed_version and _state(w_scales) == scales_version
        ):  # fmt: skip
            return {**dict(zip(_STATIC_FIELDS, static)), "weight": weight, "scale": scale}
    x_like = torch.empty(0, in_features, dtype=dtype if dtype.is_floating_point else torch.float32)
    check_packed_args("prepare_packed", x_like, packed, w_scales, in_features, group_code, None)
    codes = unpack_codes(packed, in_features)
    prepared = prepare_weight(codes, w_scales.float(), group_code, quantize_activations, dtype, chip, nz=nz,
                              graph_mode=graph_mode)  # fmt: skip
    for stale in [k for k, e in _prepared_cache.items() if e[0]() is None or e[5]() is None]:
        del _prepared_cache[stale]
    _prepared_cache[key] = (
        weakref.ref(packed), _state(packed), weakref.ref(w_scales), _state(w_scales),
        tuple(prepared[f] for f in _STATIC_FIELDS), weakref.ref(prepared["weight"]), weakref.ref(prepared["scale"]),
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
