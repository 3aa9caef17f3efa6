"""Describe a graph after the rewrite: one :class:`GraphNode` per node, for the explain report.

Read-only (nothing in the graph changes). It runs in the backend because only there are the
graph, its example inputs and the nodes that existed before the rewrite all at hand.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from bitcompile.passes.discover import LayerDecision
from bitcompile.passes.names import calling_module, placeholder_path

#: Roles of :class:`GraphNode` (what the report's picture colours them by).
NODE_ROLES = ("input", "parameter", "ternary", "inserted", "skipped", "plain", "output")


@dataclasses.dataclass
class GraphNode:
    """One node of a graph after the rewrite: just what the report's picture and tables need.

    ``role`` is ``"ternary"`` for the op a rewritten layer became, ``"inserted"`` for the
    other nodes the passes added for it (``getitem``, transposes, lowering helpers),
    ``"skipped"`` for a candidate layer kept float, ``"parameter"`` / ``"input"`` for graph
    inputs, ``"output"``, and ``"plain"`` for everything else. ``layer`` names the layer a
    ternary / inserted / skipped node belongs to.
    """

    name: str
    op: str
    target: str
    inputs: list[str]
    module: str
    role: str
    layer: str = ""
    shape: str = ""
    module_type: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _shape(node: torch.fx.Node) -> str:
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        return "x".join(str(d) for d in value.shape) or "scalar"
    return ""


def describe_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    decisions: Sequence[LayerDecision],
    existing: set[torch.fx.Node],
) -> list[GraphNode]:
    """Describe ``gm`` after the rewrite; ``existing`` are the nodes that were there before it."""
    nodes = list(gm.graph.nodes)
    examples = dict(zip([n for n in nodes if n.op == "placeholder"], example_inputs))
    skipped = {d.site.node: d.name for d in decisions if not d.rewritten and d.site is not None}
    by_weight = {d.site.weight: d.name for d in decisions if d.rewritten and d.site is not None}
    # MoE expert groups (passes/experts.py) carry their calls in ``sites``
    skipped.update({s.node: d.name for d in decisions if not d.rewritten for s in getattr(d, "sites", ())})
    by_weight.update({s.weight: d.name for d in decisions if d.rewritten for s in getattr(d, "sites", ())})
    new = [n for n in nodes if n not in existing]
    # A new node belongs to the layer whose weight it reads, or to a new neighbour's layer.
    layer_of = {n: by_weight[a] for n in new for a in n.all_input_nodes if a in by_weight}
    changed = True
    while changed:
        changed = False
        for n in new:
            if n in layer_of:
                continue
            for other in [*n.all_input_nodes, *n.users]:
                if other in layer_of and other not in existing:
                    layer_of[n], changed = layer_of[other], True
                    break
    out = []
    for n in nodes:
        layer = ""
        if n.op == "placeholder":
            example = examples.get(n)
            source = getattr(n.meta.get("grapharg"), "source", None)
            grapharg = str(getattr(source, "name", "") or "")
            is_param = isinstance(example, torch.nn.Parameter) or "_buffers" in grapharg
            role = "parameter" if is_param else "input"
            # a parameter's module path, or the argument name of an input (L['tokens'] -> tokens)
            argument = re.search(r"\[['\"]([^'\"]+)['\"]\]", grapharg)
            target = (placeholder_path(n) if is_param else (argument.group(1) if argument else "")) or str(n.target)
        elif n.op == "output":
            role, target = "output", "output"
        else:
            target = _target_name(n)
            if n in skipped:
                role, layer = "skipped", skipped[n]
            elif n not in existing:
                role = "ternary" if target.startswith(("bitcpm.", "npu.")) else "inserted"
                layer = layer_of.get(n, "")
            else:
                role = "plain"
        module = calling_module(n, within_model=True) if n.op not in ("placeholder", "output") else None
        path, cls = (module[0], getattr(module[1], "__name__", str(module[1]))) if module else ("", "")
        inputs = [a.name for a in n.all_input_nodes]
        out.append(GraphNode(n.name, n.op, target, inputs, path, role, layer, _shape(n), cls))
    return out
