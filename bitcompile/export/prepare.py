"""The module :func:`~bitcompile.export.onnx.export_onnx` hands to the exporter, and its dynamic shapes.

An unpacked model is packed (a copy); layers whose scale groups no fast ONNX block size
represents become exact float ``MatMul`` layers; a Hugging Face model is wrapped to its
``main_input_name`` → its first output (``input_ids → logits`` for a causal LM,
``pixel_values → logits`` for ViT, ``input_features → last_hidden_state`` for an audio
encoder). The user's model is never changed.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from bitcompile.config import BitcompileWarning, TernaryConfig
from bitcompile.export.layouts import block_size_for, unsupported_reason
from bitcompile.export.results import OnnxExportError
from bitcompile.kernels.groups import EPS
from bitcompile.runtime.experts import moe_layer_names
from bitcompile.runtime.modules import PackedTernaryLinear, pack, replace_submodule


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


class MainInputFirstOutput(nn.Module):
    """A Hugging Face model with its ``main_input_name`` in and its first output out (no KV cache).

    The first output of a transformers ``ModelOutput`` is its first field that is not None:
    ``logits`` for a causal LM or a classifier, ``last_hidden_state`` for an encoder.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.input_name: str = getattr(model, "main_input_name", "input_ids")
        config = getattr(model, "config", None)
        self.no_cache = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
        self.output_name = "output"

    def forward(self, main_input: torch.Tensor) -> torch.Tensor:
        return self.first_output(self.model(**{self.input_name: main_input}, **self.no_cache))

    def first_output(self, out: Any) -> torch.Tensor:
        if hasattr(out, "keys") and hasattr(out, "to_tuple"):  # a ModelOutput: its first field set
            return out.to_tuple()[0]
        return out[0] if isinstance(out, (tuple, list)) else out

    def name_output(self, main_input: torch.Tensor) -> None:
        """Run the model once (eager, no grad) to learn its first output's name (``logits``, ``last_hidden_state``)."""
        with torch.no_grad():
            out = self.model(**{self.input_name: main_input}, **self.no_cache)
        if hasattr(out, "keys") and hasattr(out, "to_tuple"):
            self.output_name = next(iter(out.keys()))


#: The old name (a causal LM: ``input_ids`` → ``logits``).
CausalLMLogits = MainInputFirstOutput


def unsupported_architecture(model: nn.Module) -> str | None:
    """One line saying why export_onnx cannot export ``model`` as one graph, or None."""
    import inspect

    try:
        takes_decoder_inputs = "decoder_input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_decoder_inputs = False
    if takes_decoder_inputs:  # an encoder alone (model.get_encoder()) shares the config but not this
        encoder = " (its encoder alone: export_onnx(model.get_encoder(), ...))" if hasattr(model, "get_encoder") else ""
        return (
            f"export_onnx: {type(model).__name__} is an encoder-decoder model, which is not exported; supported: "
            f"decoder-only LMs (input_ids -> logits) and encoders (BERT, ViT, audio: main input -> first output){encoder}"
        )
    return None


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    transformers = __import__("sys").modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _check_runs(model: nn.Module, example_inputs: tuple[Any, ...]) -> None:
    """The model's own error on its example inputs, in one line, before Dynamo's longer one."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise OnnxExportError(
            f"export_onnx: the model fails on its example inputs: {type(error).__name__}: {first}"
        ) from error
    finally:
        for module, training in modes:
            module.training = training


def prepare_model(
    model: nn.Module, config: TernaryConfig | None, example_inputs: tuple[Any, ...] | None = None
) -> tuple[nn.Module, bool, dict[str, str]]:
    """The module to export, whether it is a packed copy, and float-fallback reasons by layer name.

    An unpacked model is packed with ``pack(example_inputs=example_inputs)``: the compiler's
    capture then decides which layers are ternary, so a layer the compiler keeps float (one
    called twice, a weight read elsewhere) is exported float, as it was trained.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    if moe := moe_layer_names(model):
        raise OnnxExportError(
            f"export_onnx: MoE layer {moe[0]!r} ({len(moe)} in the model) cannot be exported: routed ternary experts "
            "have no ONNX translation yet (onnxruntime's com.microsoft.QMoE takes 4- or 8-bit experts, not 2-bit); "
            "serve MoE models with bitcompile.pack"
        )
    packed_layers = [m for m in model.modules() if isinstance(m, PackedTernaryLinear)]
    packed_copy = False
    if not packed_layers:
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise OnnxExportError(
                "export_onnx: the model has no nn.Linear and no PackedTernaryLinear layers: nothing to make ternary"
            )
        if example_inputs is not None:
            _check_runs(model, example_inputs)
        # the user's model stays as it was; example inputs: pack what the compiler made ternary
        model = pack(copy.deepcopy(model), config, example_inputs=example_inputs)
        packed_copy = True
        if not any(isinstance(m, PackedTernaryLinear) for m in model.modules()):
            reasons = "; ".join(f"{d.name}: {d.reason}" for d in model.bitcompile_pack_plan)
            raise OnnxExportError(f"export_onnx: packing approved no layer ({reasons}); check exclude/include/min_features")
    elif config is not None:
        raise OnnxExportError(
            "export_onnx: config= is for unpacked models (it tells pack() how to quantize); this model is already packed"
        )
    base3 = [name for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear) and m.layout != "2bit"]
    if base3:  # ONNX has no 5-weights-per-byte format: the same codes, 2-bit, and one warning saying so
        warnings.warn(
            f"export_onnx: {len(base3)} layer(s) packed with layout='1.6bit' ({', '.join(base3[:3])}"
            f"{', ...' if len(base3) > 3 else ''}) are written in the 2-bit layout (same codes, same results; "
            "ONNX has no 1.6-bit format)",
            BitcompileWarning,
            stacklevel=3,
        )
        if not packed_copy:
            model = copy.deepcopy(model)  # the user's packed model keeps its 1.6-bit layers
        for name in base3:
            replace_submodule(model, name, model.get_submodule(name).to_layout("2bit"))
    fallback = {
        name: unsupported_reason(m.group_code)
        for name, m in model.named_modules()
        if isinstance(m, PackedTernaryLinear) and block_size_for(m.group_code) is None
    }
    if fallback:
        if not packed_copy and not base3:
            model = copy.deepcopy(model)  # the user's packed model keeps its PackedTernaryLinear layers
        for name in fallback:
            replace_submodule(model, name, _PerTokenInt8FloatLinear(model.get_submodule(name)))
    return model, packed_copy, fallback


#: Axes 0 and 1 (batch, sequence) must stay dynamic: the export fails if the model fixes them.
_REQUIRED_DYNAMIC_AXES = 2


def default_dynamic_shapes(example_inputs: tuple[Any, ...], signal_inputs: bool = False) -> tuple[Any, ...]:
    """Every axis of integer inputs (token ids), all but the last of float inputs.

    Batch and sequence (axes 0 and 1) are ``Dim.DYNAMIC``; further axes are ``Dim.AUTO``:
    dynamic where the model allows it, static where it fixes the size (the channels a
    convolution's weight fixes), where ``Dim.DYNAMIC`` would fail the export.
    ``signal_inputs``: float inputs are images or audio features (a Hugging Face model's
    ``pixel_values`` / ``input_features``): only the batch is ``Dim.DYNAMIC``, every other axis
    ``Dim.AUTO`` (channels, mel bins, a fixed image size or frame count are the model's to fix).
    """
    Dim = torch.export.Dim
    shapes: list[Any] = []
    for arg in example_inputs:
        if not isinstance(arg, torch.Tensor):
            shapes.append(None)
            continue
        if arg.is_floating_point() and signal_inputs:
            shapes.append({i: Dim.DYNAMIC if i == 0 else Dim.AUTO for i in range(arg.dim())})
            continue
        dims = arg.dim() if not arg.is_floating_point() else arg.dim() - 1
        shapes.append({i: Dim.DYNAMIC if i < _REQUIRED_DYNAMIC_AXES else Dim.AUTO for i in range(dims)} or None)
    return tuple(shapes)


def widen_unit_dims(example_inputs: tuple[Any, ...], dynamic_shapes: tuple[Any, ...]) -> tuple[Any, ...]:
    """Repeat an example of size 1 along a batch / sequence axis to size 2.

    ``torch.export`` specializes a size-1 dimension to the constant 1 (silently, with
    ``Dim.DYNAMIC``), which would make e.g. a batch-1 example export a batch-1-only graph.
    Further (``Dim.AUTO``) axes are left as they are: the model may need their 1.
    """
    widened = []
    for arg, dims in zip(example_inputs, dynamic_shapes):
        if isinstance(arg, torch.Tensor) and dims:
            for axis, dim in dims.items():
                if axis < _REQUIRED_DYNAMIC_AXES and dim is torch.export.Dim.DYNAMIC and arg.shape[axis] == 1:
                    arg = torch.cat([arg, arg], dim=axis)
        widened.append(arg)
    return tuple(widened)
