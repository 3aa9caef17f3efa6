"""Packed MoE experts: :class:`PackedTernaryExperts`, which ``pack`` puts where a transformers
experts module (3-D ``gate_up_proj`` / ``down_proj`` parameters) was.

Each expert's two matrices become :class:`~bitcompile.runtime.layers.PackedTernaryLinear`
layers (2-bit codes, fp32 scales per expert: DESIGN.md §3), and the routed tokens run through
them one active expert at a time: one packed-kernel call per active expert and matrix, with
all the rows routed to that expert. At decode (a few routed rows) each row goes on its own,
without the sort / bincount / scatter of the grouped path: ``2 * k`` GEMV calls per token,
each the one-C-call hot path of ``PackedTernaryLinear``. (No grouped C kernel that runs
every expert in one call exists yet; bench_moe.py measures this per-expert path.) Per-expert layers also make the checkpoint need nothing new: the
packed layers are saved and loaded like any other (``experts.gate_up_proj.3``), and
:func:`install_expert_skeletons` gives ``load_packed`` their places in a float model.

The forward is transformers' experts forward (sort rows by expert, gate/up, ``act(gate) * up``,
down, weight by the router, sum over top-k in token order) with the packed layers in place of
the grouped matmuls, so it matches the ternary QAT graph that ``bitcpm::ternary_experts_linear``
runs in eval.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bitcompile.config import TernaryConfig
from bitcompile.ops import expert_rows, quantize_experts
from bitcompile.policy import layer_skip_reason
from bitcompile.runtime.layers import PackedTernaryLinear
from bitcompile.runtime.module_tree import replace_submodule
from bitcompile.targets import get_kernel

__all__ = [
    "EXPERT_WEIGHTS", "PackedTernaryExperts", "expert_modules", "experts_skip_reason", "install_expert_skeletons",
    "moe_layer_names",
]  # fmt: skip

#: The 3-D parameters of a transformers experts module, in call order.
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")

#: Up to this many routed rows (tokens x top-k) run row by row (the decode path), more are grouped by expert.
DECODE_ROWS = 8

_EXPERT_LAYER = re.compile(r"^(?P<module>.+)\.(?P<weight>gate_up_proj|down_proj)\.(?P<expert>\d+)$")


def _is_3d_parameter(module: nn.Module, name: str) -> bool:
    weight = module._parameters.get(name)
    return isinstance(weight, nn.Parameter) and weight.dim() == 3


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every float experts module of ``model`` (``gate_up_proj`` and ``down_proj`` stored 3-D), in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if all(_is_3d_parameter(module, weight) for weight in EXPERT_WEIGHTS)
    ]


def _default_apply_gate() -> Callable | None:
    try:
        from transformers.integrations import moe
    except ImportError:
        return None
    return getattr(moe, "_default_apply_gate", None)


def experts_skip_reason(name: str, module: nn.Module, config: TernaryConfig) -> str | None:
    """Why ``pack`` keeps this experts module float, or None when it packs it.

    The layer policy is asked about each expert weight (named ``<module>.gate_up_proj``); both
    are packed or neither, because the packed forward replaces the whole module.
    """
    if getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False):
        return "experts with biases or a post-expert norm are not packed (kept float)"
    if getattr(module, "_is_expert_parallel", False):
        return "expert-parallel experts are not packed (kept float)"
    if not getattr(module, "has_gate", True) or not callable(getattr(module, "act_fn", None)):
        return "experts without a gate_up projection and act_fn are not packed (kept float)"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate is not _default_apply_gate():
        return f"{type(module).__name__} has its own _apply_gate; the packed forward only knows act(gate) * up"
    if getattr(module, "is_concatenated", True) is not True:
        return "interleaved gate/up experts are not packed (kept float)"
    for weight_name in EXPERT_WEIGHTS:
        weight = module._parameters[weight_name]
        n, k = _out_in(module, weight_name)
        if (reason := layer_skip_reason(f"{name}.{weight_name}", weight[0], n, k, config)) is not None:
            return f"{weight_name}: {reason}"
        if not torch.isfinite(weight).all():
            return f"{weight_name}: weight has NaN or inf values; refusing to pack it"
    return None


def _out_in(module: nn.Module, weight_name: str) -> tuple[int, int]:
    _, rows, cols = module._parameters[weight_name].shape
    return (cols, rows) if getattr(module, "is_transposed", False) else (rows, cols)


class PackedTernaryExperts(nn.Module):
    """MoE experts with 2-bit ternary weights, called as transformers' experts modules are:
    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``.

    Children: ``gate_up_proj[e]`` and ``down_proj[e]``, one :class:`PackedTernaryLinear` per
    expert; ``act_fn`` is the float module's. Inference only.
    """

    def __init__(self, num_experts: int, act_fn: nn.Module | Callable, gate_up: list[PackedTernaryLinear],
                 down: list[PackedTernaryLinear]) -> None:  # fmt: skip
        super().__init__()
        if not (len(gate_up) == len(down) == num_experts):
            raise ValueError(f"PackedTernaryExperts: expected {num_experts} experts, got {len(gate_up)} and {len(down)} layers")
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)

    @classmethod
    def from_float(cls, module: nn.Module, config: TernaryConfig) -> PackedTernaryExperts:
        """The packed copy of a float experts module (``module`` is not changed)."""
        reference = get_kernel("reference")
        layers = {}
        for weight_name in EXPERT_WEIGHTS:
            weight = module._parameters[weight_name].detach()
            weight = weight.transpose(-2, -1) if getattr(module, "is_transposed", False) else weight
            codes, scales = quantize_experts(reference, weight.float(), config.group_code)
            layers[weight_name] = [
                PackedTernaryLinear.from_codes(codes[e], scales[e].clone(), None, config, weight.dtype).to(weight.device)
                for e in range(weight.shape[0])
            ]
        return cls(module.num_experts, module.act_fn, layers["gate_up_proj"], layers["down_proj"])

    @classmethod
    def skeleton(cls, module: nn.Module) -> PackedTernaryExperts:
        """Empty packed layers of ``module``'s shapes, for ``load_packed`` to fill (meta-free, tiny)."""
        layers = {}
        for weight_name in EXPERT_WEIGHTS:
            n, k = _out_in(module, weight_name)
            dtype = module._parameters[weight_name].dtype
            layers[weight_name] = [PackedTernaryLinear(k, n, bias=False, dtype=dtype) for _ in range(module.num_experts)]
        return cls(module.num_experts, module.act_fn, layers["gate_up_proj"], layers["down_proj"])

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        num_tokens, hidden = hidden_states.shape
        top_k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        if expert_ids.numel() <= DECODE_ROWS and not torch.compiler.is_compiling():
            routed = self._route_rows(hidden_states, expert_ids.tolist(), top_k)
        else:
            routed = hidden_states.new_zeros((num_tokens * top_k, hidden))
            for expert, rows in expert_rows(expert_ids, self.num_experts):
                routed[rows] = self._expert(expert, hidden_states[rows // top_k])
        weighted = routed * top_k_weights.reshape(-1, 1)
        return weighted.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)

    def _expert(self, expert: int, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj[expert](x).chunk(2, dim=-1)
        return self.down_proj[expert](self.act_fn(gate) * up)

    def _route_rows(self, hidden_states: Tensor, expert_ids: list[int], top_k: int) -> Tensor:
        """Decode: each routed row on its own (no sort / bincount / scatter: at one token they cost
        more than the four GEMVs). Per-token quantization makes a row's result independent of the
        rows it would have been batched with."""
        rows = [
            self._expert(expert, hidden_states[row // top_k : row // top_k + 1])
            if 0 <= expert < self.num_experts
            else hidden_states.new_zeros((1, hidden_states.shape[1]))
            for row, expert in enumerate(expert_ids)
        ]
        return torch.cat(rows)

    def extra_repr(self) -> str:
        first = self.gate_up_proj[0]
        return f"num_experts={self.num_experts}, hidden={first.in_features}, intermediate={first.out_features // 2}"


def install_expert_skeletons(model: nn.Module, layer_names: list[str]) -> Callable[[], None]:
    """Put :meth:`PackedTernaryExperts.skeleton` where a checkpoint lists packed expert layers
    (``<experts>.gate_up_proj.<e>``) and ``model`` still has the float experts module.

    Returns the function that puts the float modules back (``load_packed`` calls it when a
    later check fails, so a refused checkpoint leaves the model as it was).
    """
    modules = dict(model.named_modules())
    wanted = {m.group("module") for name in layer_names if (m := _EXPERT_LAYER.match(name))}
    originals = {}
    for name in sorted(wanted):
        module = modules.get(name)
        if module is not None and all(_is_3d_parameter(module, w) for w in EXPERT_WEIGHTS):
            originals[name] = module
    for name, module in originals.items():
        replace_submodule(model, name, PackedTernaryExperts.skeleton(module))

    def restore() -> None:
        for name, module in originals.items():
            replace_submodule(model, name, module)

    return restore


def moe_layer_names(model: nn.Module) -> list[str]:
    """The experts modules of ``model``, packed (:class:`PackedTernaryExperts`) or float, in module order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, PackedTernaryExperts) or all(_is_3d_parameter(module, w) for w in EXPERT_WEIGHTS)
    ]
