"""``export_onnx``: a packed ternary model → an ONNX file onnxruntime runs fast (DESIGN.md §6).

How: ``torch.onnx.export(dynamo=True)`` with a custom translation of
``bitcpm::ternary_linear_packed`` (:mod:`bitcompile.export.translations`). The translation
records the ternary node and tags it; once the exporter has attached the weight tensors,
:func:`~bitcompile.export.onnx_graph.rewrite_ternary_weights` converts every tagged layer's canonical packed bytes into
the target layout (:mod:`bitcompile.export.layouts`). Then the file is saved and checked
with ``onnx.checker.check_model(full_check=True)``.

Formats:

* ``"matmulnbits"`` (default): one ``com.microsoft::MatMulNBits`` per ternary layer
  (``bits=2``, ``block_size`` 128 or the group size when it is 32/64, ``accuracy_level=4``).
* ``"qdq"``: standard ONNX opset 25, ``DequantizeLinear`` on INT2 ``(K, N)`` weights with
  blocked scales → ``MatMul``; onnxruntime fuses it into MatMulNBits at load time.

The steps live in their own modules: :mod:`~bitcompile.export.prepare` (the module to
export), :mod:`~bitcompile.export.translations` (the op's ONNX form),
:mod:`~bitcompile.export.onnx_graph` (the exported graph's weights and fixes),
:mod:`~bitcompile.export.results` (what comes back). This one runs them in order.

Numerics (docs/onnx.md has the measurements): with int8 activations the per-token
quantize → dequantize of the eager op is emitted explicitly; onnxruntime then runs int8
compute with its own per-block activation scales, so results match the packed PyTorch
model to a tolerance, not bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcompile.config import TernaryConfig
from bitcompile.export.onnx_graph import keep_dq_matmul_fusable, name_dynamic_axes, rewrite_ternary_weights
from bitcompile.export.prepare import (
    MainInputFirstOutput, default_dynamic_shapes, is_hf_model, prepare_model, unsupported_architecture, widen_unit_dims,
)  # fmt: skip
from bitcompile.export.results import FORMATS, ExportedLayer, ExportResult, Format, OnnxExportError

__all__ = [
    "DEFAULT_OPSET", "FORMATS", "IR_VERSION_FOR_OPSET_25", "MIN_OPSET", "ExportResult", "ExportedLayer", "Format",
    "OnnxExportError", "check_ort_fusion", "check_output_path", "drop_debug_metadata", "export_onnx", "quiet_exporter",
    "save_and_check",
]  # fmt: skip

#: Opset used when none is given; ``qdq`` needs 25 (INT2 in DequantizeLinear).
DEFAULT_OPSET = {"matmulnbits": 21, "qdq": 25}
MIN_OPSET = {"matmulnbits": 18, "qdq": 25}
#: IR version that introduced INT2 (onnx 1.20); opset 25 needs at least this.
IR_VERSION_FOR_OPSET_25 = 13

#: Files above this are written with external data (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


#: Per-node metadata the exporter writes that only helps debugging the exporter (about
#: 1 KB per node: a tiny model's file would be mostly stack traces).
DROPPED_NODE_METADATA = (
    "pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.name_scopes",
)  # fmt: skip


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
def quiet_exporter():
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
        with quiet_exporter():
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


def drop_debug_metadata(model) -> None:
    """Drop the exporter's per-node stack traces from an ``onnx_ir`` model; keep "namespace" (the layer path)."""
    for node in model.graph.all_nodes():
        for key in DROPPED_NODE_METADATA:
            node.metadata_props.pop(key, None)


def save_and_check(model, path: Path, caller: str = "export_onnx") -> None:
    """Write an ``onnx_ir`` model to ``path`` (weights in ``path.data`` above :data:`EXTERNAL_DATA_BYTES`)
    and run ``onnx.checker.check_model(full_check=True)`` on the file."""
    import onnx
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    proto = ir.to_proto(model)
    if size > EXTERNAL_DATA_BYTES:
        Path(str(path) + ".data").unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise OnnxExportError(f"{caller}: {path} fails onnx.checker.check_model(full_check=True): {error}") from error


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
            float model (a *copy* is packed with ``config`` and ``example_inputs``, so exactly the
            layers the compiler makes ternary are ternary; ``model`` is not changed). A Hugging
            Face model is exported as its ``main_input_name`` → its first output, without KV
            cache (``input_ids → logits``, ``pixel_values → logits``, ``input_features →
            last_hidden_state``); encoder-decoder models (T5, Whisper) are refused in one line
            (their ``get_encoder()`` exports).
        example_inputs: positional inputs for tracing (a single tensor is accepted); for a
            Hugging Face model, its main input alone.
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

    hf = is_hf_model(model)
    if hf and (reason := unsupported_architecture(model)) is not None:
        raise OnnxExportError(reason)
    if hf and len(example_inputs) != 1:
        raise OnnxExportError(
            f"export_onnx: a Hugging Face model is exported with its main input "
            f"{getattr(model, 'main_input_name', 'input_ids')!r} only; got {len(example_inputs)} example inputs"
        )
    exported, packed_copy, fallback = prepare_model(model, config, example_inputs)
    if hf:
        exported = MainInputFirstOutput(exported)
        exported.name_output(example_inputs[0])
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        dynamic_shapes = default_dynamic_shapes(example_inputs, signal_inputs=hf)
        example_inputs = widen_unit_dims(example_inputs, dynamic_shapes)
    modes = [(m, m.training) for m in exported.modules()]
    exported.eval()
    try:
        with quiet_exporter(), torch.no_grad():
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
    layers = rewrite_ternary_weights(program.model, format, prefix="model." if hf else "")
    if format == "qdq":
        keep_dq_matmul_fusable(program.model)
    name_dynamic_axes(program, example_inputs)
    if hf:  # the wrapper's argument name says nothing; the model's own input name does
        program.model.graph.inputs[0].name = exported.input_name
    graph_outputs = program.model.graph.outputs
    for index, value in enumerate(graph_outputs):  # "ternary_linear_packed_14" says nothing to a user
        value.name = (exported.output_name if hf else "output") + (f"_{index}" if len(graph_outputs) > 1 else "")
    if format == "qdq":
        program.model.opset_imports[""] = opset
        program.model.ir_version = max(program.model.ir_version or 0, IR_VERSION_FOR_OPSET_25)
    # Float layers: the nn.Linear that pack() left alone, and the float fallbacks.
    ternary_names = {layer.name for layer in layers}
    root = exported.model if hf else exported
    plan = getattr(root, "bitcompile_pack_plan", None)
    for decision in plan or []:
        if not decision.packed and decision.name not in ternary_names:
            layers.append(ExportedLayer(decision.name, decision.in_features, decision.out_features, "float", decision.reason))
    for name, reason in fallback.items():
        module = root.get_submodule(name)
        layers.append(ExportedLayer(name, module.weight.shape[1], module.weight.shape[0], "float", reason))
    if not plan:  # a model packed by the user: list its remaining nn.Linear layers
        for name, module in root.named_modules():
            if isinstance(module, nn.Linear) and name not in ternary_names:
                layers.append(ExportedLayer(name, module.in_features, module.out_features, "float", "not packed"))

    drop_debug_metadata(program.model)
    save_and_check(program.model, path)
    return ExportResult(
        path=path, format=format, opset=opset, layers=layers, file_bytes=path.stat().st_size, check="passed",
        inputs=[v.name for v in program.model.graph.inputs], outputs=[v.name for v in program.model.graph.outputs],
        packed_copy=packed_copy,
    )  # fmt: skip
