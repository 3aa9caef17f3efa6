"""Graph side of precomputed per-tensor scales: strip the markers, emit the prescaled op.

A ``TensorScaledLinear`` (:mod:`bitcompile.distributed.scales`) ties its weight to its scale
buffer with ``bitcpm::tensor_scale_marker`` while it is compiled. :func:`strip_scale_markers`
removes the markers before discovery (which then sees the plain ``linear(x, weight, bias)``
it knows) and remembers which scale belongs to which weight; the training rewrite then emits
``bitcpm::ternary_linear_prescaled`` for those layers (:func:`emit_prescaled`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

import bitcompile.ops  # noqa: F401  (registers torch.ops.bitcpm.*)
from bitcompile.config import TernaryConfig

_MARKERS = (torch.ops.bitcpm.tensor_scale_marker.default, torch.ops.bitcpm.tensor_scale_marker)


def strip_scale_markers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """Remove every marker from ``gm``; returns ``{weight node: scale node}`` for the rewrite.

    The marker's users read the weight directly afterwards, so layer discovery sees the
    plain ``linear(x, weight, bias)`` it knows.
    """
    scales: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _MARKERS:
            weight, scale = node.args[0], node.args[1]
            node.replace_all_uses_with(weight)
            gm.graph.erase_node(node)
            scales[weight] = scale
    if scales:
        gm.graph.lint()
        gm.recompile()
    return scales


def emit_prescaled(
    graph: torch.fx.Graph,
    x: torch.fx.Node,
    weight: torch.fx.Node,
    bias: torch.fx.Node | None,
    scale: torch.fx.Node,
    config: TernaryConfig,
    kernel: str,
    call: Callable[[torch.fx.Graph, Any, tuple], torch.fx.Node],
) -> torch.fx.Node:
    """Nodes for ``bitcpm::ternary_linear_prescaled`` (``call`` copies metadata from the replaced node)."""
    op_args = (x, weight, bias, scale, config.quantize_activations, kernel)
    result = call(graph, torch.ops.bitcpm.ternary_linear_prescaled.default, op_args)
    return call(graph, operator.getitem, (result, 0))
