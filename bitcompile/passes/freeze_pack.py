"""Inference on frozen weights: fold quantize + pack into compile-time constants.

With ``options={"freeze": True}`` under ``model.eval()`` + ``torch.no_grad()``, each
approved layer's weight is quantized and packed once, while compiling; the graph then reads
2-bit buffers through ``bitcpm::ternary_linear_packed`` (the "quantize → pack → matmul"
pattern becomes "packed matmul" on constants).

Dynamo does not guard on parameter *values*, so a frozen graph would silently keep the
old weights after an optimizer step or ``load_state_dict``. :class:`FrozenWeightGuard`
wraps the compiled graph and checks, per call, that every frozen parameter is the same
object at the same version counter and that its contents were not written since. It never
serves stale weights.

The version counter misses writes (``p.data.copy_(w)``, ``p.data = w``, any in-place change
of an inference tensor), so the guard also checks the weight's contents record
(:mod:`bitcompile.kernels.contents`): a copy-on-write clone taken at freeze time, whose
sharing any write ends. Cost: ~0.2 µs per frozen weight per call; no memory until a weight is
written, then the clone keeps the folded values (one copy of that weight) while a graph that
folded them lives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._dynamo.source import ConstantSource

from bitcompile.config import TernaryConfig
from bitcompile.targets import get_kernel
from bitcompile.kernels.contents import Contents, contents_of, is_cow_tensor
from bitcompile.kernels.packing import pack_codes
from bitcompile.passes.discover import LayerDecision
from bitcompile.passes.ternary_rewrite import call_like, rewrite_sites


class FrozenWeightsChanged(RuntimeError):
    """A weight folded into a frozen graph changed after compilation."""


@dataclasses.dataclass
class FrozenParameter:
    """One graph input folded into a compiled graph, as :class:`FrozenWeightGuard` watches it."""

    name: str
    input_index: int
    identity: int
    version: int | None  # None for inference tensors (no version counter)
    #: how the tensor was folded, for the error message
    folded_as: str = "frozen into a compiled graph (options={'freeze': True})"
    contents: Contents | None = dataclasses.field(default=None, repr=False)
    generation: int = 0  # of ``contents`` when the tensor was folded



def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor._version``, or None for an inference tensor (created under torch.inference_mode)."""
    return None if tensor.is_inference() else tensor._version


def frozen_parameter(name: str, input_index: int, tensor: torch.Tensor, folded_as: str | None = None) -> FrozenParameter:
    """What :class:`FrozenWeightGuard` watches for graph input ``input_index`` (``tensor``), folded now."""
    extra = {} if folded_as is None else {"folded_as": folded_as}
    contents = contents_of(tensor)
    return FrozenParameter(
        name, input_index, id(tensor), version_of(tensor), contents=contents, generation=contents.generation, **extra
    )


class FrozenWeightGuard:
    """Calls the compiled graph only while every frozen parameter is unchanged."""

    def __init__(self, compiled: Callable[..., Any], frozen: Sequence[FrozenParameter]) -> None:
        self.compiled, self.frozen = compiled, tuple(frozen)
        # NOTE: plain tuples for the per-call loop (attribute lookups were half its cost)
        self._checks = tuple(
            (e.input_index, e.identity, -1 if e.version is None else e.version, e.contents, e.generation, e)
            for e in self.frozen
        )

    def __call__(self, *args: Any) -> Any:
        # Called with the graph inputs as positional args, or as one list (the "boxed" convention).
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        is_cow = is_cow_tensor
        for index, identity, version, contents, generation, entry in self._checks:
            tensor = inputs[index]
            if (
                id(tensor) != identity
                or (version >= 0 and tensor._version != version)
                or not (is_cow(tensor) and contents.cow)
                or contents.generation != generation
            ):
                self._check(entry, tensor)
        return self.compiled(*args)

    @staticmethod
    def _check(entry: FrozenParameter, tensor: torch.Tensor) -> None:
        """The slow path: another object, a new version, or a storage no longer shared copy-on-write."""
        unchanged = id(tensor) == entry.identity and (entry.version is None or tensor._version == entry.version)
        if unchanged:
            contents = entry.contents
            if not (contents.cow and is_cow_tensor(tensor)):
                contents.refresh(tensor)
            unchanged = contents.generation == entry.generation
        if not unchanged:
            raise FrozenWeightsChanged(
                f"the weight of layer {entry.name!r} changed after it was {entry.folded_as}; "
                "recompile (torch._dynamo.reset() or a new torch.compile) so inference uses the new weights"
            )


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
) -> list[FrozenParameter]:
    """Rewrite approved layers onto packed constants; returns what the guard must watch."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {node: i for i, node in enumerate(placeholders)}
    quantize = get_kernel("reference").quantize_weight
    frozen: list[FrozenParameter] = []
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
        frozen.append(frozen_parameter(decision.name, index, example_inputs[index]))
        packed = graph.get_attr(packed_name)
        scale = graph.get_attr(scales_name)
        op_args = (x, packed, scale, bias, decision.in_features, config.group_code, config.quantize_activations, kernel)
        return call_like(graph, torch.ops.bitcpm.ternary_linear_packed.default, op_args, like)

    rewrite_sites(gm, decisions, emit)
    return frozen

