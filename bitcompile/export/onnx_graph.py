"""Post-processing of the exported ONNX graph (``onnx_ir``), before the file is written.

The ternary translations (:mod:`bitcompile.export.translations`) tag each layer's node;
:func:`rewrite_ternary_weights` converts the tagged layers' canonical packed bytes into the
format's layout (:mod:`bitcompile.export.layouts`). :func:`keep_dq_matmul_fusable` keeps
onnxruntime's DQ → MatMul fusion from being blocked, and :func:`name_dynamic_axes` names the
batch and sequence axes.
"""

from __future__ import annotations

from typing import Any

import torch

from bitcompile.export.layouts import to_int2_dequantize_linear, to_matmulnbits
from bitcompile.export.results import ExportedLayer, OnnxExportError
from bitcompile.kernels.groups import ScaleGroups
from bitcompile.kernels.packing import unpack_codes


def name_dynamic_axes(program, example_inputs: tuple[Any, ...]) -> None:
    """Name the dynamic input axes ``batch`` / ``seq`` (the exporter calls them s0, s77 ...)."""
    import onnx_ir as ir

    renames: dict[str, str] = {}
    for value, arg in zip(program.model.graph.inputs, example_inputs):
        if not isinstance(arg, torch.Tensor) or value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value and axis < 2:
                renames.setdefault(dim.value, ("batch", "seq")[axis])
    if not renames:
        return
    graph = program.model.graph
    values = [*graph.inputs, *graph.outputs, *(out for node in graph.all_nodes() for out in node.outputs)]
    for value in values:  # every value: onnxruntime plans buffers by dim_param equality
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in renames for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(renames[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in renames else d for d in value.shape])


def _torch_of(value) -> torch.Tensor:
    tensor = value.const_value
    if tensor is None:
        raise OnnxExportError(f"export_onnx: {value.name!r} feeds a ternary node but is not an initializer")
    return torch.from_numpy(tensor.numpy().copy())


def rewrite_ternary_weights(model, fmt: str, prefix: str = "") -> list[ExportedLayer]:
    """Convert the tagged layers' canonical packed initializers into ``fmt``'s layout; returns the layers."""
    import onnx_ir as ir

    from bitcompile.export import translations as tr

    layers: list[ExportedLayer] = []
    converted: dict[int, tuple] = {}
    for node in list(model.graph.all_nodes()):
        kind = node.metadata_props.get(tr.TAG)
        if kind is None:
            continue
        in_features = int(node.metadata_props[tr.TAG_IN_FEATURES])
        group_code = int(node.metadata_props[tr.TAG_GROUP])
        block_size = int(node.metadata_props[tr.TAG_BLOCK])
        activations = node.metadata_props[tr.TAG_ACTIVATIONS]
        padded_n = int(node.metadata_props.get(tr.TAG_PADDED_N, 0))
        for key in (tr.TAG, tr.TAG_IN_FEATURES, tr.TAG_GROUP, tr.TAG_BLOCK, tr.TAG_ACTIVATIONS, tr.TAG_PADDED_N):
            node.metadata_props.pop(key, None)
        packed_value, scales_value = (node.inputs[1], node.inputs[2]) if kind == "matmulnbits" else node.inputs[:2]
        name = packed_value.name.removesuffix(".packed").removeprefix(prefix)
        signature = (kind, in_features, group_code, block_size)
        if id(packed_value) in converted:  # a buffer shared by two layers: converted once
            if converted[id(packed_value)] != signature:
                raise OnnxExportError(f"export_onnx: {packed_value.name!r} is used by ternary layers with different settings")
            continue
        for user, _ in [*packed_value.uses(), *scales_value.uses()]:
            if user is not node and user.op_type != node.op_type:
                raise OnnxExportError(
                    f"export_onnx: the packed weight of layer {name!r} is also read by {user.op_type} node "
                    f"{user.name!r}; only the ternary op may read packed buffers"
                )
        converted[id(packed_value)] = signature
        packed, scales = _torch_of(packed_value), _torch_of(scales_value)
        codes = unpack_codes(packed, in_features)
        out_features = codes.shape[0]
        if kind == "matmulnbits":
            weight, block_scales = to_matmulnbits(codes, scales, group_code, block_size)
        else:
            if padded_n > out_features:  # see translations.bitcpm_ternary_linear_packed_qdq
                codes = torch.cat([codes, codes.new_zeros(padded_n - out_features, in_features)])
                scales = torch.cat([scales, scales.new_ones(padded_n - out_features, scales.shape[1])])
            weight, block_scales = to_int2_dequantize_linear(codes, scales, group_code, block_size)
            # The DQ output was typed from the uint8 placeholder; it is the (K, N) float weight.
            node.outputs[0].shape = ir.Shape([in_features, codes.shape[0]])
            node.outputs[0].dtype = ir.DataType.FLOAT
            for user, _ in node.outputs[0].uses():  # the MatMul's output was inferred from it too
                a = user.inputs[0]
                user.outputs[0].shape = None if a.shape is None else ir.Shape([*list(a.shape)[:-1], codes.shape[0]])
                user.outputs[0].dtype = ir.DataType.FLOAT
        for value, array in ((packed_value, weight), (scales_value, block_scales)):
            tensor = ir.Tensor(array, name=value.name)
            value.const_value = tensor
            value.shape = ir.Shape(array.shape)
            value.dtype = tensor.dtype
        nbytes = packed_value.const_value.nbytes + scales_value.const_value.nbytes
        layers.append(
            ExportedLayer(
                name, in_features, out_features, kind, group_size=ScaleGroups.from_code(group_code).label, block_size=block_size,
                activations=activations, onnx_bytes=nbytes,
            )
        )  # fmt: skip
    return layers


def keep_dq_matmul_fusable(model) -> int:
    """Rewrite a Relu/Clip right after a ternary layer so onnxruntime still fuses DQ → MatMul.

    Two onnxruntime 1.32 rules break the fusion (measured; an unfused layer runs as DQ +
    fp32 MatMul on every call, 45-70x slower at decode):

    * ``NodeGroupSelector::GetQDQSelection`` treats a Relu/Clip that is the MatMul's only
      consumer, with one consumer itself, as a "redundant clip" before a QuantizeLinear;
      with no QuantizeLinear there it rejects the whole group.
    * With 2-D activations, ``MatMulAddFusion`` turns MatMul + bias Add into a Gemm, and
      ``GemmActivationFusion`` then turns Gemm + Relu into a FusedGemm, which the DQ fusion
      does not match.

    ``Max(y, 0)`` (and ``Max``/``Min`` for Clip) computes the same and matches neither.
    Returns the number of rewritten activations.
    """
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    outputs = set(map(id, graph.outputs))
    rewritten = 0
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or dq.inputs[0].dtype != ir.DataType.INT2:
            continue
        for matmul, _ in list(dq.outputs[0].uses()):
            if matmul.op_type != "MatMul":
                continue
            y = matmul.outputs[0]
            uses = list(y.uses())
            if len(uses) == 1 and uses[0][0].op_type == "Add" and id(y) not in outputs:
                y = uses[0][0].outputs[0]  # the bias Add: in 2-D, MatMul + Add becomes a Gemm first
                uses = list(y.uses())
            if len(uses) != 1 or id(y) in outputs or uses[0][0].op_type not in ("Relu", "Clip"):
                continue
            act = uses[0][0]
            bounds = [ir.Value(name=f"{act.name}_zero", const_value=ir.tensor(np.array(0.0, dtype=np.float32)))] if act.op_type == "Relu" else []
            for bound in bounds:
                graph.initializers[bound.name] = bound
            ops = [("Max", bounds[0])] if act.op_type == "Relu" else [
                (op, v) for op, v in zip(("Max", "Min"), list(act.inputs[1:]) + [None]) if v is not None
            ]  # fmt: skip
            value, new_nodes = y, []
            for op_type, bound in ops:
                node = ir.Node("", op_type, [value, bound], name=f"{act.name}_{op_type.lower()}")
                new_nodes.append(node)
                value = node.outputs[0]
            if not new_nodes:  # Clip without bounds is an identity; leave it
                continue
            graph.insert_after(act, new_nodes)
            old, name = act.outputs[0], act.outputs[0].name
            value.shape, value.dtype = old.shape, old.dtype
            old.replace_all_uses_with(value, replace_graph_outputs=True)
            old.name, value.name = None, name
            graph.remove(act, safe=True)
            rewritten += 1
    return rewritten
