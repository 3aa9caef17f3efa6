"""Training rewrite of layers whose weight is a DTensor (``torch.distributed.tensor.parallel``).

Dynamo traces a tensor-parallel model with DTensor weights and activations; AOTAutograd then
runs each op's DTensor rule and hands the inner compiler a graph of local tensors and
collectives. This pass replaces such a layer's ``linear`` with
``bitcpm::ternary_linear_sharded`` (:mod:`bitcompile.ops.sharded`) and, where a local shard
cannot see a whole scale group, computes the scale in the graph with DTensor reductions, so
DTensor issues the collective:

==============  =====================  ======================================================
layer           scale mode             in the graph
==============  =====================  ======================================================
column-parallel per-row, per-group     nothing: rows are whole on every rank
row-parallel    per-row                ``sum |W|`` over K → one vector all-reduce
row-parallel    per-group              nothing, if no group straddles two K shards (else refused)
either          per-tensor             ``sum |W|`` → one scalar all-reduce
row-parallel    int8 activations       per-token ``max |x|`` over K → one vector all-reduce (max)
==============  =====================  ======================================================

The activation absmax of a row-parallel layer is reduced across the group (not taken over
the local K shard) so that the codes are those one process computes: TP training then matches
1-process training to the order of fp32 sums. It costs ``4 * tokens`` bytes per layer and
forward, next to the ``4 * tokens * N`` bytes of the output all-reduce.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.fx

from bitcompile.config import TernaryConfig, TernaryConfigError
from bitcompile.kernels.groups import PER_TENSOR

Parallel = Literal["column", "row", "replicated"]


class TensorParallelError(TernaryConfigError):
    """A tensor-parallel layer whose sharding the ternary scales cannot follow."""


def _value(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def dtensor_weight(node: Any) -> Any:
    """The (fake) DTensor a weight node holds, or None for a plain tensor."""
    value = _value(node)
    if value is None or type(value).__name__ != "DTensor":
        return None
    return value


def parallel_kind(name: str, weight: Any) -> tuple[Parallel, int]:
    """(``column`` / ``row`` / ``replicated``, ranks the weight is sharded over) from its placements."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = [(dim, p) for dim, p in enumerate(weight.placements) if not isinstance(p, Replicate)]
    if not sharded:
        return "replicated", 1
    if len(sharded) > 1 or not isinstance(sharded[0][1], Shard) or sharded[0][1].dim not in (0, 1):
        raise TensorParallelError(
            f"bitcpm: layer {name!r} has a weight with placements {tuple(weight.placements)}; tensor-parallel "
            "ternary layers need it sharded along one mesh dimension, by rows (Shard(0), ColwiseParallel) "
            "or by columns (Shard(1), RowwiseParallel)"
        )
    mesh_dim, placement = sharded[0]
    return ("column" if placement.dim == 0 else "row"), weight.device_mesh.size(mesh_dim)


def _check_groups(name: str, weight: Any, ranks: int, group_size: int) -> None:
    k = weight.shape[1]
    if k % ranks or (k // ranks) % group_size:
        raise TensorParallelError(
            f"bitcpm: layer {name!r} is row-parallel over {ranks} ranks (K={k}, {k / ranks:g} columns per rank) and "
            f"its scale groups of {group_size} would straddle two ranks' shards; use a group_size that divides "
            f"{k // ranks if k % ranks == 0 else 'the shard width'}, or per-row scales (group_size=-1)"
        )


def emit_tensor_parallel(
    graph: torch.fx.Graph,
    name: str,
    x: torch.fx.Node,
    weight: torch.fx.Node,
    bias: Any,
    config: TernaryConfig,
    kernel: str,
    call: Callable[[torch.fx.Graph, Any, tuple, dict | None], torch.fx.Node],
) -> torch.fx.Node:
    """Nodes computing ``x @ ternary(W)^T (+ bias)`` for a DTensor weight; returns the output node.

    ``call(graph, target, args, kwargs)`` builds a call_function node carrying the replaced node's
    metadata. Raises :class:`TensorParallelError` (one line naming the layer) for a sharding the
    scales cannot follow.
    """
    from bitcompile.ops.sharded import register_dtensor_rules

    register_dtensor_rules()
    value = dtensor_weight(weight)
    kind, ranks = parallel_kind(name, value)
    if config.backward_precision != "fp32":
        raise TensorParallelError(
            f"bitcpm: layer {name!r} is tensor-parallel; backward_precision={config.backward_precision!r} is "
            "not supported there yet (use the default 'fp32')"
        )
    group = config.group_code
    if kind == "row" and group > 0:
        _check_groups(name, value, ranks, group)

    def abs_sum(node: torch.fx.Node, **kwargs: Any) -> torch.fx.Node:
        w = call(graph, torch.Tensor.detach, (node,), None)
        w = call(graph, torch.Tensor.float, (w,), None)
        w = call(graph, torch.abs, (w,), None)
        return call(graph, torch.sum, (w,), kwargs or None)

    weight_scale = None
    if group == PER_TENSOR:  # global absmean: a Partial(sum) scalar that the op's rule asks Replicate
        weight_scale = call(graph, operator.truediv, (abs_sum(weight), float(value.numel())), None)
    elif kind == "row" and group < 0:  # per-row absmean over the whole K: a Partial(sum) vector
        weight_scale = call(graph, operator.truediv, (abs_sum(weight, dim=1, keepdim=True), float(value.shape[1])), None)
    x_absmax = None
    if kind == "row" and config.quantize_activations:  # per-token max |x| over the whole K: a Partial(max)
        a = call(graph, torch.Tensor.detach, (x,), None)
        a = call(graph, torch.Tensor.float, (a,), None)
        a = call(graph, torch.abs, (a,), None)
        x_absmax = call(graph, torch.amax, (a,), {"dim": -1})
    local_bias = None if kind == "row" else bias  # a row-parallel partial sum gets its bias once, after
    op_args = (x, weight, local_bias, weight_scale, x_absmax, group, config.quantize_activations, kernel)
    result = call(graph, torch.ops.bitcpm.ternary_linear_sharded.default, op_args, None)
    out = call(graph, operator.getitem, (result, 0), None)
    if kind == "row" and bias is not None:
        out = call(graph, torch.add, (out, bias), None)
    return out
