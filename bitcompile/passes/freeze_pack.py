"""Inference on frozen weights: fold quantize + pack into compile-time constants.

With ``options={"freeze": True}`` under ``model.eval()`` + ``torch.no_grad()``, each
approved layer's weight is quantized and packed once, while compiling; the graph then reads
2-bit buffers through ``bitcpm::ternary_linear_packed`` (the "quantize → pack → matmul"
pattern becomes "packed matmul" on constants).

Dynamo does not guard on parameter *values*, so a frozen graph would silently keep the
old weights after an optimizer step or ``load_state_dict``. :class:`FrozenWeightGuard`
wraps the compiled graph and checks, per call, that every frozen parameter is the same
object at the same version counter (a handful of integer comparisons); otherwise it raises
and asks for a recompile. It never serves stale weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.source import ConstantSource

from bitcompile.config import TernaryConfig
from bitcompile.kernels import get_kernel
from bitcompile.kernels.packing import pack_codes
from bitcompile.passes.discover import LayerDecision
from bitcompile.passes.ternary_rewrite import _call, rewrite_sites


class FrozenWeightsChanged(RuntimeError):
    """A weight folded into a frozen graph changed after compilation."""


@dataclasses.dataclass(frozen=True)
class _FrozenParameter:
    name: str
    input_index: int
    identity: int
    version: int | None  # None for inference tensors (no version counter): identity only
    #: how the tensor was folded, for the error message
    folded_as: str = "frozen into a compiled graph (options={'freeze': True})"


def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor._version``, or None for an inference tensor (created under torch.inference_mode)."""
    return None if tensor.is_inference() else tensor._version


class FrozenWeightGuard:
    """Calls the compiled graph only while every frozen parameter is unchanged."""

    def __init__(self, compiled: Callable[..., Any], frozen: Sequence[_FrozenParameter]) -> None:
        self.compiled, self.frozen = compiled, tuple(frozen)

    def __call__(self, *args: Any) -> Any:
        # Called with the graph inputs as positional args, or as one list (the "boxed" convention).
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        for entry in self.frozen:
            tensor = inputs[entry.input_index]
            if id(tensor) != entry.identity or (entry.version is not None and tensor._version != entry.version):
                raise FrozenWeightsChanged(
                    f"the weight of layer {entry.name!r} changed after it was {entry.folded_as}; "
                    "recompile (torch._dynamo.reset() or a new torch.compile) so inference uses the new weights"
                )
        return self.compiled(*args)


def check_can_freeze() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "bitcpm option freeze=True folds the weights into constants and is inference-only: "
            "call the compiled model under torch.no_grad() (and model.eval())"
        )


def freeze_pack(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    decisions: Sequence[LayerDecision],
    config: TernaryConfig,
    kernel: str,
) -> list[_FrozenParameter]:
    """Rewrite approved layers onto packed constants; returns what the guard must watch."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {node: i for i, node in enumerate(placeholders)}
    quantize = get_kernel("reference").quantize_weight
    frozen: list[_FrozenParameter] = []
    if not hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source = {}

    def register(name: str, tensor: torch.Tensor) -> str:
        gm.register_buffer(name, tensor)
        # AOTAutograd looks every buffer up here (it fails with "... not found in param_name_to_source").
        gm._param_name_to_source[name] = ConstantSource(name)
        return name

    def emit(graph, decision, x, bias, like):
        site = decision.site
        index = index_of[site.weight]
        weight = example_inputs[index].detach()
        weight = weight.t() if site.layout == "in_out" else weight
        codes, scales = quantize(weight, config.group_code)
        slot = len(frozen)
        packed_name = register(f"_bitcpm_frozen_packed_{slot}", pack_codes(codes))
        scales_name = register(f"_bitcpm_frozen_scales_{slot}", scales)
        source = example_inputs[index]
        frozen.append(_FrozenParameter(decision.name, index, id(source), version_of(source)))
        packed = graph.get_attr(packed_name)
        scale = graph.get_attr(scales_name)
        op_args = (x, packed, scale, bias, decision.in_features, config.group_code, config.quantize_activations, kernel)
        return _call(graph, torch.ops.bitcpm.ternary_linear_packed.default, op_args, like)

    rewrite_sites(gm, decisions, emit)
    return frozen

