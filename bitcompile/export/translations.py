"""ONNX translations of the ``bitcpm::`` inference ops for ``torch.onnx.export(dynamo=True)``.

Rules of this module:

- One translation per op and format, named namespace + op + format, registered in
  :data:`TRANSLATIONS` under the op's overload.
- The first docstring line is the op's schema.
- A translation only *records* nodes: the weight initializers still hold the canonical
  packed bytes (``bc_i2_planar256_t64``) when it runs, because the exporter attaches the
  tensors after the graph is built. Each recorded ternary node is tagged in
  ``metadata_props`` (:data:`TAG`) with what :mod:`bitcompile.export.onnx` needs to rewrite
  those initializers into the target layout afterwards (``bitcompile.export.layouts``).
  So the translation must feed ``packed`` and ``scales`` straight into its node, never
  through another op (the exporter's optimizer could fold it).
- Comments say where ONNX and the eager op differ.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op
from onnxscript import opset21
from onnxscript import values

from bitcompile.export.layouts import block_size_for, unsupported_reason
from bitcompile.kernels.groups import EPS

#: ``metadata_props`` keys on the nodes a translation records (removed before saving).
TAG = "bitcompile.ternary"  # "matmulnbits" | "qdq"
TAG_IN_FEATURES = "bitcompile.in_features"
TAG_GROUP = "bitcompile.group_size"
TAG_BLOCK = "bitcompile.block_size"
TAG_ACTIVATIONS = "bitcompile.activations"
TAG_PADDED_N = "bitcompile.padded_out_features"  # qdq only, when N % 4 != 0

MICROSOFT_DOMAIN = "com.microsoft"


def _matmulnbits_schema() -> onnx.defs.OpSchema:
    """``com.microsoft::MatMulNBits`` as onnxruntime 1.32 registers it.

    onnx has no schema for contrib ops and the exporter's tracer needs one. Optional
    attributes are declared *without* defaults: the exporter writes every default it
    knows, and older onnxruntime builds reject attributes they do not know
    (``weight_prepacked`` is new), so it is left out altogether.
    """
    schema = onnx.defs.OpSchema
    param, optional = schema.FormalParameter, schema.FormalParameterOption.Optional
    attr, INT = schema.Attribute, schema.AttrType.INT
    return schema(
        "MatMulNBits",
        MICROSOFT_DOMAIN,
        1,
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("scales", "T1"),
            param("zero_points", "T3", param_option=optional),
            param("g_idx", "T4", param_option=optional),
            param("bias", "T1", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], "CPU kernels: float and float16"),
            ("T2", ["tensor(uint8)"], "packed weight blobs"),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points"),
            ("T4", ["tensor(int32)"], "group index (deprecated)"),
        ],
        attributes=[
            attr("K", INT, "input features", required=True),
            attr("N", INT, "output features", required=True),
            attr("block_size", INT, "k values per scale block (power of 2, >= 16)", required=True),
            attr("bits", INT, "bits per weight: 2, 4 or 8", required=False),
            attr("accuracy_level", INT, "0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute", required=False),
        ],
    )


MatMulNBits = values.Op(onnxscript.values.Opset(MICROSOFT_DOMAIN, 1), "MatMulNBits", _matmulnbits_schema())


class UnsupportedLayerError(ValueError):
    """A ternary layer has a property the chosen ONNX format cannot represent."""


def _tag(value, kind: str, in_features: int, group_size: int, block_size: int, quantize_activations: bool) -> None:
    node = value.producer()
    node.metadata_props[TAG] = kind
    node.metadata_props[TAG_IN_FEATURES] = str(in_features)
    node.metadata_props[TAG_GROUP] = str(group_size)
    node.metadata_props[TAG_BLOCK] = str(block_size)
    node.metadata_props[TAG_ACTIVATIONS] = "int8" if quantize_activations else "none"


def _check_dtype(x, op_name: str = "ternary_linear_packed") -> None:
    if x.dtype != ir.DataType.FLOAT:
        # MatMulNBits' CPU kernel takes float/float16, and the per-token quantizer below is
        # written in fp32 like the eager op; a bf16 model must be exported in fp32.
        raise UnsupportedLayerError(
            f"bitcpm::{op_name}: input dtype {x.dtype} is not supported by the ONNX export; "
            "export a float32 model (model.float())"
        )


def _per_token_int8(x):
    """Per-token absmax int8 quantize → dequantize, exactly the eager op's first step (DESIGN.md §3).

    ``s = max(max|x_row|, eps) / 127``, ``q = clamp(round(x / s), -128, 127)``, returns
    ``q * s``. ONNX ``Round`` rounds half to even like ``torch.round``, and the division is
    the same IEEE fp32 division, so ``q`` is bit-identical to the eager codes.
    """
    absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Div(op.Max(absmax, op.Constant(value_float=EPS)), op.Constant(value_float=127.0))
    codes = op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
    return op.Mul(codes, scale)


def bitcpm_ternary_linear_packed_matmulnbits(
    x, packed, scales, bias, in_features: int, group_size: int, quantize_activations: bool, kernel: str
):
    """ternary_linear_packed(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int in_features, int group_size, bool quantize_activations, str kernel) -> Tensor

    One ``com.microsoft::MatMulNBits`` node: ``bits=2``, ``accuracy_level=4`` (int8 compute;
    levels 0/1 run a 2-bit kernel about 100x slower), no zero point (default 2, so the
    stored code is ``w + 2``), the bias as its optional last input. ``kernel`` has no ONNX
    meaning (onnxruntime picks its own).

    Differs from eager: accuracy_level=4 quantizes A to int8 *per block* of ``block_size``
    along K, where the eager op quantizes per token (whole row). With int8 activations the
    per-token quantize → dequantize is emitted first, so MatMulNBits sees the eager op's
    dequantized activations and its own re-quantization adds at most half a per-block step.
    """
    _check_dtype(x)
    block_size = block_size_for(group_size)
    if block_size is None:
        _no_fast_block(group_size)
    a = _per_token_int8(x) if quantize_activations else x
    n = packed.shape[0]
    inputs = [a, packed, scales] + ([None, None, bias] if bias is not None else [])
    y = MatMulNBits(*inputs, K=in_features, N=n, bits=2, block_size=block_size, accuracy_level=4)
    _tag(y, "matmulnbits", in_features, group_size, block_size, quantize_activations)
    return y


def bitcpm_ternary_linear_packed_qdq(
    x, packed, scales, bias, in_features: int, group_size: int, quantize_activations: bool, kernel: str
):
    """ternary_linear_packed(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int in_features, int group_size, bool quantize_activations, str kernel) -> Tensor

    Standard ONNX: ``MatMul(x, DequantizeLinear(w_int2 (K, N), scales (K/bs, N), axis=0,
    block_size=bs))`` then ``Add(bias)``. The weight is stored ``(K, N)`` because
    onnxruntime fuses DQ → MatMul into MatMulNBits only when DQ feeds MatMul's B directly.

    Differs from eager: recorded with a uint8 placeholder (the packed bytes); the
    exporter-side rewrite turns it into INT2, which needs opset 25. onnxruntime's fusion
    uses accuracy_level=4 (per-block int8 activations) like the MatMulNBits format.
    """
    _check_dtype(x)
    block_size = block_size_for(group_size)
    if block_size is None:
        _no_fast_block(group_size)
    a = _per_token_int8(x) if quantize_activations else x
    weight = opset21.DequantizeLinear(packed, scales, axis=0, block_size=block_size)
    _tag(weight, "qdq", in_features, group_size, block_size, quantize_activations)
    y = op.MatMul(a, weight)
    n = packed.shape[0]
    if n % 4:
        # onnxruntime 1.32's DQ → MatMulNBits fusion reads an INT2 (K, N) weight wrongly when
        # N % 4 != 0 (a row does not end on a byte; measured: relative error ~1). The rewrite
        # pads N with zero weights to a multiple of 4 and this Slice drops the padded outputs.
        weight.producer().metadata_props[TAG_PADDED_N] = str(-(-n // 4) * 4)
        y = op.Slice(y, op.Constant(value_ints=[0]), op.Constant(value_ints=[n]), op.Constant(value_ints=[-1]))
    return op.Add(y, bias) if bias is not None else y


def bitcpm_int8_dense_linear(x, codes, scales, bias):
    """int8_dense_linear(Tensor x, Tensor codes, Tensor scales, Tensor? bias) -> Tensor

    The W8A8 head of ``pack(head="int8")`` in standard ONNX: the eager op's per-token int8
    codes of ``x`` (shifted to uint8 with zero point 128), ``MatMulInteger`` with the int8
    weight codes (exact int32 sums), then
    ``(float)sum * s_w * s_x (+ b)``, the eager op's order of roundings. The ``(N, K)`` codes
    are transposed in the graph so that a tied ``Int8Embedding``'s ``Gather`` and this node
    read one initializer.
    """
    _check_dtype(x, "int8_dense_linear")
    absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    x_scale = op.Div(op.Max(absmax, op.Constant(value_float=EPS)), op.Constant(value_float=127.0))
    rounded = op.Clip(op.Round(op.Div(x, x_scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
    # The codes go in as uint8 (code + 128, zero point 128): the same int32 sums, but
    # onnxruntime's u8s8 kernel; its s8s8 path is ~12x slower at decode (K=576, N=49152).
    x_codes = op.Cast(op.Add(rounded, op.Constant(value_float=128.0)), to=onnx.TensorProto.UINT8)
    zero_point = op.Constant(value=onnx.helper.make_tensor("x_zero_point", onnx.TensorProto.UINT8, [], [128]))
    sums = op.MatMulInteger(x_codes, op.Transpose(codes, perm=[1, 0]), zero_point)
    y = op.Mul(op.Mul(op.Cast(sums, to=onnx.TensorProto.FLOAT), op.Transpose(scales, perm=[1, 0])), x_scale)
    return op.Add(y, bias) if bias is not None else y


def bitcpm_float_gemv_linear(x, weight, bias):
    """float_gemv_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor

    ``F.linear``: the op only picks bitcompile's multi-threaded GEMV in PyTorch; ONNX runtimes
    pick their own.
    """
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return op.Add(y, bias) if bias is not None else y


def _no_fast_block(group_size: int):
    # export_onnx swaps such layers for a float MatMul before tracing; reaching this is a bug
    # or a direct use of the translation table.
    raise UnsupportedLayerError(f"bitcpm::ternary_linear_packed: {unsupported_reason(group_size)}")


def translation_table(fmt: str) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` in format ``fmt``."""
    import torch

    import bitcompile.runtime.int8_head  # noqa: F401  (registers torch.ops.bitcpm.int8_dense_linear)
    import bitcompile.runtime.ops  # noqa: F401  (registers torch.ops.bitcpm.*)

    function = {"matmulnbits": bitcpm_ternary_linear_packed_matmulnbits, "qdq": bitcpm_ternary_linear_packed_qdq}[fmt]
    return {
        torch.ops.bitcpm.ternary_linear_packed.default: function,
        torch.ops.bitcpm.int8_dense_linear.default: bitcpm_int8_dense_linear,
        torch.ops.bitcpm.float_gemv_linear.default: bitcpm_float_gemv_linear,
    }
