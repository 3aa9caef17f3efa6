"""Rewrite the layers :mod:`discover` approved into ``bitcpm::ternary_linear`` calls.

Runs on the Dynamo (Torch-IR) graph, before AOTAutograd, so the custom op's own autograd
(the fused straight-through backward) is what AOTAutograd traces. Layouts other than
nn.Linear's ``(out, in)`` get a transpose of the *latent* weight in front of the op, so
gradients flow back to the parameter the user owns through an ordinary view.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
import torch.fx

from bitcompile.config import TernaryConfig
from bitcompile.passes.discover import LayerDecision

log = logging.getLogger(__name__)

_COPIED_META = ("nn_module_stack", "source_fn_stack", "stack_trace", "seq_nr")


def _call(graph: torch.fx.Graph, target, args, like: torch.fx.Node) -> torch.fx.Node:
    node = graph.call_function(target, args)
    for key in _COPIED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def ternary_rewrite(
    gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision], config: TernaryConfig, kernel: str
) -> int:
    """Replace every approved linear-like node; returns how many were replaced."""
    graph = gm.graph
    replaced = 0
    # Sites were found before any rewrite; an activation may be a node we since replaced.
    new_value: dict[torch.fx.Node, torch.fx.Node] = {}
    for decision in decisions:
        site = decision.site
        if not decision.rewritten or site is None or site.node.graph is not graph:
            continue
        node = site.node
        with graph.inserting_before(node):
            x, weight = new_value.get(site.activation, site.activation), site.weight
            if site.layout == "in_out":
                weight = _call(graph, torch.t, (weight,), node)
            if site.layout == "left":
                x = _call(graph, torch.transpose, (x, -1, -2), node)
            added = new_value.get(site.bias, site.bias)
            bias = added if site.kind == "linear" else None
            op_args = (x, weight, bias, config.group_code, config.quantize_activations, kernel)
            result = _call(graph, torch.ops.bitcpm.ternary_linear.default, op_args, node)
            out = _call(graph, operator.getitem, (result, 0), node)
            if site.layout == "left":
                out = _call(graph, torch.transpose, (out, -1, -2), node)
            if site.kind == "addmm":
                out = _call(graph, torch.add, (added, out), node)
        node.replace_all_uses_with(out)
        new_value[node] = out
        graph.erase_node(node)
        replaced += 1
        log.debug("bitcpm: %s (%s, %s) -> bitcpm::ternary_linear", decision.name, site.kind, site.layout)
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced
