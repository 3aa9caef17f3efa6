"""Rewrite the layers :mod:`discover` approved into ``bitcpm::ternary_linear`` calls.

Runs on the Dynamo (Torch-IR) graph, before AOTAutograd, so the custom op's own autograd
(the fused straight-through backward) is what AOTAutograd traces. Layouts other than
nn.Linear's ``(out, in)`` get a transpose of the *latent* weight in front of the op, so
gradients flow back to the parameter the user owns through an ordinary view.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from bitcompile.config import TernaryConfig
from bitcompile.passes.discover import LayerDecision
from bitcompile.passes.precomputed_scales import emit_prescaled
from bitcompile.passes.tensor_parallel import TensorParallelError, dtensor_weight, emit_tensor_parallel

log = logging.getLogger(__name__)

_COPIED_META = ("nn_module_stack", "source_fn_stack", "stack_trace", "seq_nr")


def call_like(graph: torch.fx.Graph, target, args, like: torch.fx.Node, kwargs: dict | None = None) -> torch.fx.Node:
    """``graph.call_function(target, args, kwargs)`` carrying ``like``'s source metadata (module stack, trace)."""
    node = graph.call_function(target, args, kwargs)
    for key in _COPIED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _rank(node: torch.fx.Node) -> int:
    """Dimensions of ``node``'s value (discover keeps weight-first sites whose rank it cannot see float)."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dim()


#: Emits the nodes computing ``x @ W^T (+ bias)`` for an ``(out, in)``-layout weight; returns the output node.
Emitter = Callable[[torch.fx.Graph, LayerDecision, torch.fx.Node, Any, torch.fx.Node], torch.fx.Node]


def rewrite_sites(gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision], emit: Emitter) -> int:
    """Replace every approved linear-like node by what ``emit`` builds; returns how many.

    Handles the layouts around the emitted core: ``W @ x`` (and ``W.t() @ x``) with a matrix
    ``x`` gets transposes of ``x`` and the output (a 1-D ``x`` is already a single token:
    ``W @ v == v @ W.T``), addmm's added term is added back. ``emit`` receives ``(graph, decision, x,
    bias, like)`` and deals with the weight itself (transposing ``(in, out)`` weights).
    """
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
            x = new_value.get(site.activation, site.activation)
            transpose = site.weight_first and _rank(site.activation) >= 2
            if transpose:
                x = call_like(graph, torch.transpose, (x, -1, -2), node)
            added = new_value.get(site.bias, site.bias)
            out = emit(graph, decision, x, added if site.kind == "linear" else None, node)
            if transpose:
                out = call_like(graph, torch.transpose, (out, -1, -2), node)
            if site.kind == "addmm":
                out = call_like(graph, torch.add, (added, out), node)
        node.replace_all_uses_with(out)
        new_value[node] = out
        graph.erase_node(node)
        replaced += 1
        log.debug("bitcpm: %s (%s, %s) rewritten", decision.name, site.kind, site.layout)
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced


def ternary_rewrite(
    gm: torch.fx.GraphModule,
    decisions: Sequence[LayerDecision],
    config: TernaryConfig,
    kernel: str,
    tensor_scales: Mapping[torch.fx.Node, torch.fx.Node] | None = None,
) -> int:
    """Training rewrite: approved layers → ``bitcpm::ternary_linear`` on the latent weight.

    ``tensor_scales`` maps weight nodes to precomputed per-tensor scale nodes (from
    :func:`bitcompile.passes.precomputed_scales.strip_scale_markers`); with ``group_size="tensor"``
    those layers become ``bitcpm::ternary_linear_prescaled`` instead. Layers whose weight is a
    DTensor (tensor parallelism) become ``bitcpm::ternary_linear_sharded``
    (:mod:`bitcompile.passes.tensor_parallel`).
    """

    def emit(graph, decision, x, bias, like):
        weight = decision.site.weight
        if dtensor_weight(weight) is not None:
            if decision.site.layout != "out_in":
                raise TensorParallelError(
                    f"bitcpm: layer {decision.name!r} is tensor-parallel with a {decision.site.layout!r} weight layout; "
                    "only nn.Linear's (out, in) layout is supported under tensor parallelism"
                )
            return emit_tensor_parallel(
                graph, decision.name, x, weight, bias, config, kernel,
                lambda g, t, a, kw: call_like(g, t, a, like, kw),
            )  # fmt: skip
        scale = (tensor_scales or {}).get(weight) if config.group_size.kind == "tensor" else None
        if scale is not None and decision.site.layout == "out_in":
            return emit_prescaled(
                graph, x, weight, bias, scale, config, kernel, lambda g, t, a: call_like(g, t, a, like)
            )
        if decision.site.layout == "in_out":
            weight = call_like(graph, torch.t, (weight,), like)
        op_args = (x, weight, bias, config.group_code, config.quantize_activations, kernel)
        if config.backward_precision != "fp32":  # the op's default; graphs stay 6-arg otherwise
            op_args = (*op_args, config.backward_precision)
        result = call_like(graph, torch.ops.bitcpm.ternary_linear.default, op_args, like)
        return call_like(graph, operator.getitem, (result, 0), like)

    return rewrite_sites(gm, decisions, emit)
