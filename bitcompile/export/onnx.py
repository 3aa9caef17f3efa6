"""``export_onnx``: a packed ternary model → an ONNX file onnxruntime runs fast (DESIGN.md §6).

How: ``torch.onnx.export(dynamo=True)`` with a custom translation of
``bitcpm::ternary_linear_packed`` (:mod:`bitcompile.export.translations`). The translation
records the ternary node and tags it; once the exporter has attached the weight tensors,
:func:`_rewrite_ternary_weights` converts every tagged layer's canonical packed bytes into
the target layout (:mod:`bitcompile.export.layouts`). Then the file is saved and checked
with ``onnx.checker.check_model(full_check=True)``.

Formats:

* ``"matmulnbits"`` (default): one ``com.microsoft::MatMulNBits`` per ternary layer
  (``bits=2``, ``block_size`` 128 or the group size when it is 32/64, ``accuracy_level=4``).
* ``"qdq"``: standard ONNX opset 25, ``DequantizeLinear`` on INT2 ``(K, N)`` weights with
  blocked scales → ``MatMul``; onnxruntime fuses it into MatMulNBits at load time.

Numerics (docs/onnx.md has the measurements): with int8 activations the per-token
quantize → dequantize of the eager op is emitted explicitly; onnxruntime then runs int8
compute with its own per-block activation scales, so results match the packed PyTorch
model to a tolerance, not bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bitcompile.config import TernaryConfig
from bitcompile.export.layouts import block_size_for, to_int2_dequantize_linear, to_matmulnbits, unsupported_reason
from bitcompile.kernels.groups import EPS, describe
from bitcompile.kernels.packing import unpack_codes
from bitcompile.runtime.modules import PackedTernaryLinear, pack, replace_submodule

Format = Literal["matmulnbits", "qdq"]
FORMATS = ("matmulnbits", "qdq")

#: Opset used when none is given; ``qdq`` needs 25 (INT2 in DequantizeLinear).
DEFAULT_OPSET = {"matmulnbits": 21, "qdq": 25}
MIN_OPSET = {"matmulnbits": 18, "qdq": 25}
#: IR version that introduced INT2 (onnx 1.20); opset 25 needs at least this.
IR_VERSION_FOR_OPSET_25 = 13

#: Files above this are written with external data (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_800_000_000


#: Per-node metadata the exporter writes that only helps debugging the exporter (about
#: 1 KB per node: a tiny model's file would be mostly stack traces).
_DROPPED_NODE_METADATA = (
    "pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.name_scopes",
)  # fmt: skip


class OnnxExportError(RuntimeError):
    """The model could not be exported; the message names the layer or node and what to do."""


@dataclasses.dataclass
class ExportedLayer:
    """One linear layer of the exported model and how it was written."""

    name: str
    in_features: int
    out_features: int
    kind: str  # "matmulnbits" | "qdq" (ternary) or "float"
    reason: str = ""  # why a layer stayed float
    group_size: str = ""
    block_size: int = 0
    activations: str = ""
    onnx_bytes: int = 0  # bytes of its weight + scale initializers in the file

    @property
    def ternary(self) -> bool:
        return self.kind in FORMATS

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.in_features * self.out_features


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the file, every linear layer, the checker result."""

    path: Path
    format: str
    opset: int
    layers: list[ExportedLayer]
    file_bytes: int
    check: str
    inputs: list[str]
    outputs: list[str]
    packed_copy: bool  # True when the model was unpacked and a packed copy was exported

    @property
    def ternary_layers(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if layer.ternary]

    @property
    def float_layers(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if not layer.ternary]

    @property
    def ternary_weight_bytes(self) -> int:
        return sum(layer.onnx_bytes for layer in self.ternary_layers)

    @property
    def ternary_fp32_bytes(self) -> int:
        return sum(layer.fp32_bytes for layer in self.ternary_layers)

    @property
    def fp32_file_bytes_estimate(self) -> int:
        """The file size with the ternary layers' weights written as fp32 (an fp32 export's size)."""
        return self.file_bytes - self.ternary_weight_bytes + self.ternary_fp32_bytes

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, opset {self.opset})"]
        lines.append(f"inputs: {', '.join(self.inputs)}; outputs: {', '.join(self.outputs)}")
        if self.packed_copy:
            lines.append("the model was not packed: exported a packed copy (your model is unchanged)")
        lines.append(f"ternary layers: {len(self.ternary_layers)}")
        for layer in self.ternary_layers:
            lines.append(
                f"  {layer.name:<40} {layer.out_features}x{layer.in_features}  {layer.group_size} scales, "
                f"block {layer.block_size}, activations {layer.activations}, {layer.onnx_bytes:,} B"
            )
        lines.append(f"float layers: {len(self.float_layers)}")
        for layer in self.float_layers:
            lines.append(f"  {layer.name:<40} {layer.out_features}x{layer.in_features}  {layer.reason}")
        ratio = self.ternary_fp32_bytes / max(self.ternary_weight_bytes, 1)
        lines.append(
            f"ternary weights: {self.ternary_weight_bytes:,} B (fp32: {self.ternary_fp32_bytes:,} B, {ratio:.1f}x smaller)"
        )
        file_ratio = self.fp32_file_bytes_estimate / max(self.file_bytes, 1)
        lines.append(
            f"file size: {self.file_bytes:,} B (an fp32 export: about {self.fp32_file_bytes_estimate:,} B, "
            f"{file_ratio:.1f}x larger)"
        )
        lines.append(f"onnx.checker.check_model(full_check=True): {self.check}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Model preparation


class _PerTokenInt8FloatLinear(nn.Module):
    """A ternary layer written as a float ``MatMul`` of its dequantized weight (exact, not compressed).

    Used for groupings no fast MatMulNBits block size represents; keeps the eager op's
    per-token int8 activation quantization so the numerics do not change.
    """

    def __init__(self, layer: PackedTernaryLinear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.dequantized_weight())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float())
        self.quantize_activations = layer.quantize_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(EPS) / 127
            x = torch.clamp(torch.round(x / scale), -128, 127) * scale
        return nn.functional.linear(x, self.weight, self.bias)


class _CausalLMLogits(nn.Module):
    """A Hugging Face model with only ``input_ids`` in and ``logits`` out (no KV cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _is_hf_model(model: nn.Module) -> bool:
    transformers = __import__("sys").modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _prepare(model: nn.Module, config: TernaryConfig | None) -> tuple[nn.Module, bool, dict[str, str]]:
    """The module to export, whether it is a packed copy, and float-fallback reasons by layer name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    packed_layers = [m for m in model.modules() if isinstance(m, PackedTernaryLinear)]
    packed_copy = False
    if not packed_layers:
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise OnnxExportError(
                "export_onnx: the model has no nn.Linear and no PackedTernaryLinear layers: nothing to make ternary"
            )
        model = pack(copy.deepcopy(model), config)  # the user's model stays as it was
        packed_copy = True
        if not any(isinstance(m, PackedTernaryLinear) for m in model.modules()):
            reasons = "; ".join(f"{d.name}: {d.reason}" for d in model.bitcompile_pack_plan)
            raise OnnxExportError(f"export_onnx: packing approved no layer ({reasons}); check exclude/include/min_features")
    elif config is not None:
        raise OnnxExportError(
            "export_onnx: config= is for unpacked models (it tells pack() how to quantize); this model is already packed"
        )
    fallback = {
        name: unsupported_reason(m.group_code)
        for name, m in model.named_modules()
        if isinstance(m, PackedTernaryLinear) and block_size_for(m.group_code) is None
    }
    if fallback:
        if not packed_copy:
            model = copy.deepcopy(model)  # the user's packed model keeps its PackedTernaryLinear layers
        for name in fallback:
            replace_submodule(model, name, _PerTokenInt8FloatLinear(model.get_submodule(name)))
    return model, packed_copy, fallback


#: Axes 0 and 1 (batch, sequence) must stay dynamic: the export fails if the model fixes them.
_REQUIRED_DYNAMIC_AXES = 2


def _default_dynamic_shapes(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Every axis of integer inputs (token ids), all but the last of float inputs.

    Batch and sequence (axes 0 and 1) are ``Dim.DYNAMIC``; further axes are ``Dim.AUTO``:
    dynamic where the model allows it, static where it fixes the size (the channels a
    convolution's weight fixes), where ``Dim.DYNAMIC`` would fail the export.
    """
    Dim = torch.export.Dim
    shapes: list[Any] = []
    for arg in example_inputs:
        if not isinstance(arg, torch.Tensor):
            shapes.append(None)
            continue
        dims = arg.dim() if not arg.is_floating_point() else arg.dim() - 1
        shapes.append({i: Dim.DYNAMIC if i < _REQUIRED_DYNAMIC_AXES else Dim.AUTO for i in range(dims)} or None)
    return tuple(shapes)


def _widen_unit_dims(example_inputs: tuple[Any, ...], dynamic_shapes: tuple[Any, ...]) -> tuple[Any, ...]:
    """Repeat an example of size 1 along a batch / sequence axis to size 2.

    ``torch.export`` specializes a size-1 dimension to the constant 1 (silently, with
    ``Dim.DYNAMIC``), which would make e.g. a batch-1 example export a batch-1-only graph.
    Further (``Dim.AUTO``) axes are left as they are: the model may need their 1.
    """
    widened = []
    for arg, dims in zip(example_inputs, dynamic_shapes):
        if isinstance(arg, torch.Tensor) and dims:
            for axis in dims:
                if axis < _REQUIRED_DYNAMIC_AXES and arg.shape[axis] == 1:
                    arg = torch.cat([arg, arg], dim=axis)
        widened.append(arg)
    return tuple(widened)


def _dim_names(program, example_inputs: tuple[Any, ...]) -> None:
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


# ---------------------------------------------------------------------------------------------
# Weight rewrite


def _torch_of(value) -> torch.Tensor:
    tensor = value.const_value
    if tensor is None:
        raise OnnxExportError(f"export_onnx: {value.name!r} feeds a ternary node but is not an initializer")
    return torch.from_numpy(tensor.numpy().copy())


def _rewrite_ternary_weights(model, fmt: str, prefix: str = "") -> list[ExportedLayer]:
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
                name, in_features, out_features, kind, group_size=describe(group_code), block_size=block_size,
                activations=activations, onnx_bytes=nbytes,
            )
        )  # fmt: skip
    return layers


def _keep_dq_matmul_fusable(model) -> int:
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


def check_ort_fusion(path: str | os.PathLike) -> dict[str, Any]:
    """Load ``path`` in onnxruntime (CPU, default optimizations) and inspect the optimized graph.

    Returns ``{"matmulnbits": n, "ternary_layers": [...], "unfused": [...], "ops": {...}}``:
    a ternary layer of a ``qdq`` file is *unfused* when a ``DequantizeLinear`` still reads
    its INT2 weight after onnxruntime's optimizations (it then runs as DQ + fp32 MatMul on
    every call). For a ``matmulnbits`` file every ternary layer is already one node.
    """
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    original = onnx.load(str(path), load_external_data=False)
    int2 = {t.name for t in original.graph.initializer if t.data_type == onnx.TensorProto.INT2}
    ternary = sorted(
        n.input[1].removesuffix(".packed") for n in original.graph.node if n.op_type == "MatMulNBits"
    ) or sorted(name.removesuffix(".packed") for name in int2)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    unfused = sorted(
        n.input[0].removesuffix(".packed") for n in optimized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int2
    )
    ops = Counter(n.op_type for n in optimized.graph.node)
    return {"matmulnbits": ops.get("MatMulNBits", 0), "ternary_layers": ternary, "unfused": unfused, "ops": dict(ops)}


# ---------------------------------------------------------------------------------------------
# Entry point


def check_output_path(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise (:class:`OnnxExportError`, ``FileExistsError``, ``PermissionError``) unless
    :func:`export_onnx` can write ``path``; the CLI calls it before loading the model."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OnnxExportError(f"export_onnx: {str(path)!r} is a directory; give a file path such as model.onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(f"export_onnx: {str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OnnxExportError(f"export_onnx: cannot write {str(path)!r}: {str(parent)!r} is not a folder")
    if not parent.is_dir():
        raise OnnxExportError(f"export_onnx: cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"export_onnx: cannot write {str(path)!r}: permission denied")


def _check_opset(fmt: str, opset: int | None) -> int:
    import onnx

    if opset is None:
        return DEFAULT_OPSET[fmt]
    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET[fmt] <= opset <= highest:
        why = " (INT2 DequantizeLinear needs opset 25)" if fmt == "qdq" else ""
        raise ValueError(
            f"export_onnx: opset={opset!r} is invalid for format {fmt!r}: expected {MIN_OPSET[fmt]}..{highest}{why}"
        )
    return opset


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and warns about torchvision, and logs the errors it then
    raises (which export_onnx reports in one line); keep the caller's output clean."""
    from bitcompile.backend import quiet_torch_error_logs

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_torch_error_logs():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _conversion_error(error: Exception, model: nn.Module, example_inputs: tuple, dynamic_shapes) -> OnnxExportError:
    """An exporter failure as one message naming the FX node, its target and the layer it came from."""
    text = "\n".join(str(e) for e in _chain(error))
    import re

    node_info = ""
    try:  # find the node: re-trace (cheap next to the failed export) and match the exporter's node name
        names = set(re.findall(r"(?:node|Node)\s+[`'\"]?%?([A-Za-z_]\w*)", text))
        with _quiet_exporter():
            program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
            program = program.run_decompositions()
        for node in program.graph.nodes:
            if node.name in names and node.op == "call_function":
                stack = node.meta.get("nn_module_stack") or {}
                layer = list(stack.values())[-1][0] if stack else "(top level)"
                node_info = f" at node {node.name!r} ({node.target}) in layer {layer!r}"
                break
    except Exception:  # the original error is what matters
        pass
    root = list(_chain(error))[-1]  # the innermost error says what is missing ("No ONNX function found for ...")
    first = next((line for line in str(root).splitlines() if line.strip()), type(root).__name__)
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    return OnnxExportError(f"export_onnx: the exporter could not translate the model{node_info}: {first}")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    path: str | os.PathLike,
    *,
    format: Format = "matmulnbits",
    dynamic_shapes: Any = "auto",
    opset: int | None = None,
    config: TernaryConfig | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export a packed (or packable) ternary model to ONNX for onnxruntime.

    Args:
        model: a model with :class:`~bitcompile.PackedTernaryLinear` layers, or an unpacked
            float model (a *copy* is packed with ``config``; ``model`` is not changed). A
            Hugging Face causal LM is exported as ``input_ids → logits`` without KV cache.
        example_inputs: positional inputs for tracing (a single tensor is accepted).
        path: the ``.onnx`` file to write.
        format: ``"matmulnbits"`` (``com.microsoft::MatMulNBits``, fastest in onnxruntime)
            or ``"qdq"`` (standard ONNX opset 25: INT2 ``DequantizeLinear`` → ``MatMul``).
        dynamic_shapes: ``"auto"`` makes every axis of integer inputs and every axis but the
            last of float inputs dynamic (batch and sequence, axes 0-1, must be; further axes
            are where the model allows); ``None`` exports static shapes; anything else goes
            to ``torch.onnx.export`` as is.
        opset: default opset (21 for matmulnbits, 25 for qdq, which needs >= 25).
        config: how to pack an unpacked model (default :class:`~bitcompile.TernaryConfig`).
        overwrite: replace an existing file.

    Returns:
        :class:`ExportResult` (``.summary()`` is what the CLI prints).
    """
    if format not in FORMATS:
        raise ValueError(f"export_onnx: format={format!r} is invalid: expected one of {FORMATS}")
    opset = _check_opset(format, opset)
    path = Path(path)
    check_output_path(path, overwrite)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"export_onnx: example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    example_inputs = tuple(example_inputs)
    try:
        import onnx
        import onnx_ir as ir
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise OnnxExportError(
            f"export_onnx needs onnx, onnxscript and onnxruntime: pip install 'bitcompile[onnx]' ({error})"
        ) from error
    from bitcompile.export.translations import UnsupportedLayerError, translation_table

    exported, packed_copy, fallback = _prepare(model, config)
    hf = _is_hf_model(exported)
    if hf:
        exported = _CausalLMLogits(exported)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        dynamic_shapes = _default_dynamic_shapes(example_inputs)
        example_inputs = _widen_unit_dims(example_inputs, dynamic_shapes)
    modes = [(m, m.training) for m in exported.modules()]
    exported.eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                exported, example_inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(format), verbose=False, optimize=True,
            )  # fmt: skip
    except UnsupportedLayerError:
        raise
    except Exception as error:
        unsupported = next((e for e in _chain(error) if isinstance(e, UnsupportedLayerError)), None)
        if unsupported is not None:
            raise OnnxExportError(f"export_onnx: {unsupported}") from error
        raise _conversion_error(error, exported, example_inputs, dynamic_shapes) from error
    finally:
        for module, training in modes:
            module.training = training
    layers = _rewrite_ternary_weights(program.model, format, prefix="model." if hf else "")
    if format == "qdq":
        _keep_dq_matmul_fusable(program.model)
    _dim_names(program, example_inputs)
    graph_outputs = program.model.graph.outputs
    for index, value in enumerate(graph_outputs):  # "ternary_linear_packed_14" says nothing to a user
        value.name = ("logits" if hf else "output") + (f"_{index}" if len(graph_outputs) > 1 else "")
    if format == "qdq":
        program.model.opset_imports[""] = opset
        program.model.ir_version = max(program.model.ir_version or 0, IR_VERSION_FOR_OPSET_25)
    # Float layers: the nn.Linear that pack() left alone, and the float fallbacks.
    ternary_names = {layer.name for layer in layers}
    plan = getattr(exported if not isinstance(exported, _CausalLMLogits) else exported.model, "bitcompile_pack_plan", None)
    for decision in plan or []:
        if not decision.packed and decision.name not in ternary_names:
            layers.append(ExportedLayer(decision.name, decision.in_features, decision.out_features, "float", decision.reason))
    for name, reason in fallback.items():
        module = exported.get_submodule(name) if not isinstance(exported, _CausalLMLogits) else exported.model.get_submodule(name)
        layers.append(ExportedLayer(name, module.weight.shape[1], module.weight.shape[0], "float", reason))
    if not plan:  # a model packed by the user: list its remaining nn.Linear layers
        root = exported.model if isinstance(exported, _CausalLMLogits) else exported
        for name, module in root.named_modules():
            if isinstance(module, nn.Linear) and name not in ternary_names:
                layers.append(ExportedLayer(name, module.in_features, module.out_features, "float", "not packed"))

    for node in program.model.graph.all_nodes():  # keep "namespace" (the layer path), drop stack traces
        for key in _DROPPED_NODE_METADATA:
            node.metadata_props.pop(key, None)
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    proto = ir.to_proto(program.model)
    if size > _EXTERNAL_DATA_BYTES:
        Path(str(path) + ".data").unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise OnnxExportError(f"export_onnx: {path} fails onnx.checker.check_model(full_check=True): {error}") from error
    return ExportResult(
        path=path, format=format, opset=opset, layers=layers, file_bytes=path.stat().st_size, check="passed",
        inputs=[v.name for v in program.model.graph.inputs], outputs=[v.name for v in program.model.graph.outputs],
        packed_copy=packed_copy,
    )  # fmt: skip
