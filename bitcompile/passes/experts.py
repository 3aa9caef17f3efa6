"""Find MoE expert weights in a Dynamo graph, decide per expert group, and rewrite them ternary.

transformers 5.x stores an MoE layer's experts as 3-D parameters (``experts.gate_up_proj
(E, 2I, H)``, ``experts.down_proj (E, H, I)``) and runs them through one of its experts
implementations (``config._experts_implementation``). What each puts in the Dynamo graph::

    grouped_mm (default)   transformers.grouped_mm_fallback(x, w.transpose(-2, -1), offs)   fp32 / fp16
                           torch.nn.functional.grouped_mm(x, w.transpose(-2, -1), offs=offs) bf16
    batched_mm             sel = w[expert_ids]; torch.bmm(sel, x.unsqueeze(-1))
    eager                  a Python loop over the experts hit; Dynamo breaks the graph on it,
                           so the expert weights never reach a graph (nothing to find here)

(``is_transposed`` experts store ``(E, K, N)``: no transpose before grouped_mm, ``bmm(x.unsqueeze(1),
sel)``.) Each recognised call becomes ``bitcpm::ternary_experts_linear`` on the latent 3-D
weight with per-row expert ids, so every routed row meets its own expert's ternary weight
(:mod:`bitcompile.ops.experts`)::

    before:  t = w.transpose(-2, -1); y = grouped_mm_fallback(x, t, offs)
    after:   ids = expert_ids_from_offsets(offs, x); y = ternary_experts_linear(x, w, ids, ...)[0]

A weight is rewritten only when every read of it is such a call; otherwise it stays float
and its decision says who else reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

import bitcompile.ops  # noqa: F401  (registers torch.ops.bitcpm.ternary_experts_linear)
from bitcompile.config import TernaryConfig
from bitcompile.kernels.groups import num_groups
from bitcompile.kernels.packing import packed_shape
from bitcompile.passes.discover import LayerDecision
from bitcompile.passes.names import attribute_value, placeholder_path
from bitcompile.passes.ternary_rewrite import call_like
from bitcompile.policy import layer_skip_reason

log = logging.getLogger(__name__)

__all__ = [
    "ExpertSite", "ExpertsDecision", "discover_experts", "expert_ids_from_offsets", "rewrite_experts",
    "warn_experts_outside_graphs",
]  # fmt: skip

#: The kernels whose contract functions the experts op runs on (a lowering target plans linears only).
EXPERT_KERNELS = ("reference", "cpu")


def _grouped_mm_targets() -> set[Any]:
    targets: set[Any] = set()
    if hasattr(torch.nn.functional, "grouped_mm"):
        targets.add(torch.nn.functional.grouped_mm)
    if hasattr(torch, "_grouped_mm"):
        targets.add(torch._grouped_mm)
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        targets.update({transformers_ops.grouped_mm_fallback, transformers_ops.grouped_mm_fallback.default})
    return targets


@dataclasses.dataclass(frozen=True)
class ExpertSite:
    """One call that reads a 3-D expert weight, and how.

    ``kind`` is ``"grouped_mm"`` (rows sorted by expert, ``routing`` the cumulative offsets) or
    ``"batched_mm"`` (``routing`` the per-row expert ids; ``gather`` the ``w[expert_ids]`` node).
    ``layout`` is ``"out_in"`` for ``(E, N, K)`` weights, ``"in_out"`` for ``(E, K, N)``.
    """

    node: torch.fx.Node
    kind: str
    activation: torch.fx.Node
    weight: torch.fx.Node
    routing: torch.fx.Node
    layout: str
    gather: torch.fx.Node | None = None
    #: nodes between the weight and the call (a transpose) that die with the rewrite
    via: tuple[torch.fx.Node, ...] = ()


@dataclasses.dataclass
class ExpertsDecision(LayerDecision):
    """An expert group (one 3-D weight): ``out_features`` / ``in_features`` are one expert's."""

    num_experts: int = 0
    sites: tuple[ExpertSite, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        row = super().to_json()
        row.pop("sites", None)
        return row


def expert_ids_from_offsets(offsets: Tensor, rows: Tensor) -> Tensor:
    """The expert of each row of a grouped_mm input: rows ``offsets[e-1] <= r < offsets[e]`` are expert ``e``.

    Rows at or past ``offsets[-1]`` get ``E`` (no expert): grouped_mm leaves them out too.
    """
    positions = torch.arange(rows.shape[0], device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, positions, right=True)


def _value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _stored(node: Any, stored: Mapping[torch.fx.Node, Any]) -> Any:
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "placeholder":
        return stored.get(node)
    if node.op == "get_attr":
        return attribute_value(node)
    return None


def _is_3d_stored(node: Any, stored: Mapping[torch.fx.Node, Any]) -> bool:
    tensor = _stored(node, stored)
    return isinstance(tensor, Tensor) and tensor.dim() == 3


def _swaps_last_two(node: torch.fx.Node) -> bool:
    """``w.transpose(-2, -1)`` / ``(1, 2)`` / ``w.mT`` of a 3-D ``w``."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        return True
    is_transpose = (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target in (torch.transpose, torch.ops.aten.transpose.int)
    )
    dims = node.args[1:3]
    return is_transpose and len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 3 for d in dims} == {1, 2}


def _arg(node: torch.fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _grouped_site(node: torch.fx.Node, stored: Mapping[torch.fx.Node, Any], targets: set[Any]) -> ExpertSite | None:
    if node.op != "call_function" or node.target not in targets:
        return None
    x, weight, offs = _arg(node, 0, "input" if "transformers" in str(node.target) else "mat_a"), _arg(node, 1, "weight" if "transformers" in str(node.target) else "mat_b"), _arg(node, 2, "offs")
    if not isinstance(weight, torch.fx.Node) or not isinstance(offs, torch.fx.Node):
        return None
    if _is_3d_stored(weight, stored):
        return ExpertSite(node, "grouped_mm", x, weight, offs, "in_out")
    if _swaps_last_two(weight) and _is_3d_stored(weight.args[0], stored):
        return ExpertSite(node, "grouped_mm", x, weight.args[0], offs, "out_in", via=(weight,))
    return None


def _batched_site(node: torch.fx.Node, stored: Mapping[torch.fx.Node, Any]) -> ExpertSite | None:
    if node.op != "call_function" or node.target not in (torch.bmm, torch.ops.aten.bmm.default) or len(node.args) != 2:
        return None

    def gather_of(arg: Any) -> torch.fx.Node | None:
        is_gather = (
            isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target is operator.getitem
            and _is_3d_stored(arg.args[0], stored) and isinstance(arg.args[1], torch.fx.Node)
        )  # fmt: skip
        return arg if is_gather else None

    a, b = node.args
    if (gather := gather_of(a)) is not None:  # bmm(w[ids], x.unsqueeze(-1)): (E, N, K) weights
        return ExpertSite(node, "batched_mm", b, gather.args[0], gather.args[1], "out_in", gather=gather)
    if (gather := gather_of(b)) is not None:  # bmm(x.unsqueeze(1), w[ids]): (E, K, N) weights
        return ExpertSite(node, "batched_mm", a, gather.args[0], gather.args[1], "in_out", gather=gather)
    return None


def _skip_reason(
    weight: Any, name: str, n: int, k: int, sites: list[ExpertSite], readers: list[torch.fx.Node], config: TernaryConfig
) -> str | None:
    if not isinstance(weight, nn.Parameter):
        return "expert weight is a buffer or constant tensor, not an nn.Parameter"
    if readers:
        others = ", ".join(sorted({getattr(r.target, "__name__", str(r.target)) for r in readers}))
        return f"expert weight is also read outside the experts' matmuls ({others})"
    if (reason := layer_skip_reason(name, weight[0], n, k, config)) is not None:
        return reason
    for site in sites:
        if site.kind == "grouped_mm" and _arg(site.node, 3, "bias") is not None:
            return "grouped_mm with a bias is not rewritten"
        x = _value(site.activation)
        if isinstance(x, Tensor) and not x.is_floating_point():
            return f"input dtype {x.dtype} is not floating point"
    if config.freeze:
        return "freeze=True folds linear layers only; experts stay float in this graph (bitcompile.pack packs them)"
    return None


def discover_experts(
    gm: torch.fx.GraphModule, stored: Mapping[torch.fx.Node, Any], config: TernaryConfig
) -> list[ExpertsDecision]:
    """One :class:`ExpertsDecision` per 3-D expert weight read by a grouped_mm / batched_mm call, in graph order."""
    targets = _grouped_mm_targets()
    by_weight: dict[torch.fx.Node, list[ExpertSite]] = {}
    for node in gm.graph.nodes:
        site = _grouped_site(node, stored, targets) or _batched_site(node, stored)
        if site is not None:
            by_weight.setdefault(site.weight, []).append(site)
    decisions = []
    for weight_node, sites in by_weight.items():
        weight = _stored(weight_node, stored)
        known = {s.gather or s.node for s in sites} | {v for s in sites for v in s.via}
        readers = [u for u in weight_node.users if u not in known]
        readers += [u for s in sites for v in (*s.via, *([s.gather] if s.gather else [])) for u in v.users if u is not s.node]
        n_experts, rows, cols = weight.shape
        layout = sites[0].layout
        if any(s.layout != layout for s in sites):
            readers.append(sites[-1].node)
        n, k = (rows, cols) if layout == "out_in" else (cols, rows)
        path = (placeholder_path(weight_node) if weight_node.op == "placeholder" else str(weight_node.target)) or weight_node.name
        reason = _skip_reason(weight, path, n, k, sites, readers, config)
        implementation = " + ".join(sorted({s.kind for s in sites}))
        acts = "int8 activations" if config.quantize_activations else "weight-only"
        mode = config.group_size.label
        shape = f"{n_experts} experts of ({n}, {k})"
        decisions.append(
            ExpertsDecision(
                name=path,
                weight_name=path,
                kind="experts",
                layout=layout,
                out_features=n,
                in_features=k,
                dtype=str(weight.dtype).removeprefix("torch."),
                rewritten=reason is None,
                rationale=f"{shape}: {reason}" if reason else f"{shape}: ternary per expert ({mode} scales), {acts}, {implementation}",
                group_size=config.group_size,
                fp_bytes=weight.numel() * weight.element_size(),
                packed_bytes=n_experts * _packed_nbytes(n, k, config.group_code) if reason is None else 0,
                num_experts=n_experts,
                sites=tuple(sites),
            )
        )
    return decisions


def _packed_nbytes(n: int, k: int, group_code: int) -> int:
    rows, row_bytes = packed_shape(n, k)
    return rows * row_bytes + 4 * n * num_groups(k, group_code)


def rewrite_experts(gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision], config: TernaryConfig, kernel: str) -> int:
    """Replace every approved expert call by ``bitcpm::ternary_experts_linear``; returns how many calls.

    On a kernel without the experts op (a lowering target) the groups stay float and their
    decisions say so.
    """
    graph = gm.graph
    replaced = 0
    for decision in decisions:
        if not isinstance(decision, ExpertsDecision) or not decision.rewritten:
            continue
        if kernel not in EXPERT_KERNELS:
            decision.rewritten, decision.packed_bytes = False, 0
            decision.rationale += f"; not rewritten: target {kernel!r} has no ternary experts kernel (kept float)"
            continue
        for site in decision.sites:
            _rewrite_site(graph, site, config, kernel)
            replaced += 1
        log.debug("bitcpm: experts %s rewritten (%d calls)", decision.name, len(decision.sites))
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced


def _rewrite_site(graph: torch.fx.Graph, site: ExpertSite, config: TernaryConfig, kernel: str) -> None:
    node = site.node
    with graph.inserting_before(node):
        weight = site.weight
        if site.layout == "in_out":
            weight = call_like(graph, torch.transpose, (weight, -2, -1), node)
        if site.kind == "grouped_mm":
            x = site.activation
            ids = call_like(graph, expert_ids_from_offsets, (site.routing, x), node)
        else:  # bmm(sel, x[..., None]) or bmm(x[:, None], sel): the routed rows are x without that unit dim
            unit_dim = -1 if site.layout == "out_in" else 1
            x = call_like(graph, torch.squeeze, (site.activation, unit_dim), node)
            ids = site.routing
        op_args = (x, weight, ids, config.group_code, config.quantize_activations, kernel)
        result = call_like(graph, torch.ops.bitcpm.ternary_experts_linear.default, op_args, node)
        out = call_like(graph, operator.getitem, (result, 0), node)
        if site.kind == "batched_mm":
            out = call_like(graph, torch.unsqueeze, (out, unit_dim), node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    for dead in (site.gather, *site.via):
        if dead is not None and not dead.users:
            graph.erase_node(dead)


def warn_experts_outside_graphs(model: nn.Module, decisions: Sequence[LayerDecision]) -> list[str]:
    """Warn about float experts modules of ``model`` none of whose weights reached a compiled graph.

    transformers' ``experts_implementation="eager"`` loops over the experts hit in Python;
    Dynamo breaks the graph there and the loop runs uncompiled, so its experts would silently
    train in float. Returns the names warned about.
    """
    from bitcompile.config import BitcompileWarning
    from bitcompile.runtime.experts import expert_modules

    seen = {d.name.rpartition(".")[0] for d in decisions if isinstance(d, ExpertsDecision)}
    missing = [(name, module) for name, module in expert_modules(model) if name not in seen]
    if missing:
        implementation = getattr(getattr(missing[0][1], "config", None), "_experts_implementation", None)
        names = ", ".join(name for name, _ in missing[:3]) + (", ..." if len(missing) > 3 else "")
        warnings.warn(
            f"MoE experts {names} ({len(missing)} module(s)) never reached a compiled graph "
            f"(experts_implementation={implementation!r} runs them outside it), so training keeps them float; "
            "use model.set_experts_implementation('grouped_mm')",
            BitcompileWarning,
            stacklevel=3,
        )
    return [name for name, _ in missing]
