"""The ``bitcpm`` torch.compile backend.

``torch.compile(model, backend="bitcpm", options={...})`` finds this module through the
``torch_dynamo_backends`` entry point in pyproject.toml, so users never import it. (It is
deliberately *not* decorated with ``register_backend``: the entry-point loader registers it,
and a second registration raises "duplicate name" in a fresh process.)

Per Dynamo graph: parse options → discover candidate layers → rewrite the approved ones
into ``bitcpm::ternary_linear`` → hand the graph to the inner compiler (inductor by
default), where our ops stay opaque extern calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx

import bitcompile.runtime.ops  # noqa: F401  (registers torch.ops.bitcpm.*)
from bitcompile.config import TernaryConfig
from bitcompile.distributed.ops import strip_scale_markers
from bitcompile.kernels import resolve_target
from bitcompile.passes.discover import LayerDecision, discover
from bitcompile.passes.freeze_pack import FrozenWeightGuard, check_can_freeze, freeze_pack
from bitcompile.passes.names import calling_module, placeholder_path
from bitcompile.passes.ternary_rewrite import ternary_rewrite

log = logging.getLogger(__name__)

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


@dataclasses.dataclass
class CompiledGraph:
    """What the backend did to one Dynamo graph (the explain report is built from these)."""

    compile_id: str
    graph_break_reason: str | None
    before: str
    after: str
    layers: list[LayerDecision]
    kernel: str
    nodes: list[GraphNode] = dataclasses.field(default_factory=list)
    #: before-rewrite node name -> layer name, for every node a rewrite replaced
    replaced: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the rewritten graph and its example inputs (for MLIR export); not serialized
    graph_module: torch.fx.GraphModule | None = dataclasses.field(default=None, repr=False, compare=False)
    example_inputs: Sequence[Any] = dataclasses.field(default=(), repr=False, compare=False)


_observers: list[Callable[[CompiledGraph], None]] = []


@contextlib.contextmanager
def observe_compilations(callback: Callable[[CompiledGraph], None]) -> Iterator[None]:
    """Call ``callback`` with a :class:`CompiledGraph` for every graph compiled in this block."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


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


def _graph_nodes(
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
        module = calling_module(n) if n.op not in ("placeholder", "output") else None
        path, cls = (module[0], getattr(module[1], "__name__", str(module[1]))) if module else ("", "")
        inputs = [a.name for a in n.all_input_nodes]
        out.append(GraphNode(n.name, n.op, target, inputs, path, role, layer, _shape(n), cls))
    return out


def _graph_break_reason(gm: torch.fx.GraphModule) -> str | None:
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    return str(reason.reason)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inner: str, mode: str | None):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TernaryConfig,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Rewrite one Dynamo graph for ``config`` and compile it with ``config.inner``."""
    kernel = resolve_target(config.target, example_inputs)
    # Only explain/inspect (observers) need the graph as it was; skip the work otherwise.
    before = gm.code if _observers else ""
    existing = set(gm.graph.nodes) if _observers else set()
    # Precomputed per-tensor scales (bitcompile.distributed): weight node -> scale node.
    tensor_scales = strip_scale_markers(gm)
    decisions = discover(gm, example_inputs, config)
    frozen = []
    if config.freeze:
        check_can_freeze()
        frozen = freeze_pack(gm, example_inputs, decisions, config, kernel)
        replaced = len(frozen)
    else:
        replaced = ternary_rewrite(gm, decisions, config, kernel, tensor_scales if kernel != "cann" else None)
    log.info("bitcpm: rewrote %d of %d linear-like layers", replaced, len(decisions))
    compiled, after = None, None
    if kernel == "cann":
        # Ascend: route layers to torch_npu kernels or the float path, lower them after AOT, compile.
        from bitcompile.passes.lower_cann import compile_for_cann

        compiled, after = compile_for_cann(gm, example_inputs, decisions, config, mode)
    if _observers:
        compile_id = str(torch._guards.CompileContext.current_compile_id() or "")
        record = CompiledGraph(
            compile_id,
            _graph_break_reason(gm),
            before,
            gm.code if after is None else after,
            decisions,
            kernel,
            nodes=_graph_nodes(gm, example_inputs, decisions, existing),
            replaced={d.site.node.name: d.name for d in decisions if d.rewritten and d.site is not None},
            graph_module=gm,
            example_inputs=tuple(example_inputs),
        )
        for callback in list(_observers):
            callback(record)
    if compiled is None:
        compiled = _inner_compile(gm, example_inputs, config.inner, mode)
    return FrozenWeightGuard(compiled, frozen) if frozen else compiled


def bitcpm(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The ``backend="bitcpm"`` entry point: ``options`` are parsed into a :class:`TernaryConfig`."""
    return compile_graph(gm, example_inputs, TernaryConfig.from_options(options), mode=mode)


def capture(model: torch.nn.Module, example_inputs: Sequence[Any], config: TernaryConfig) -> list[CompiledGraph]:
    """Run ``model`` once through Dynamo and the bitcpm passes (no inner compiler, no grad).

    Like ``torch._dynamo.explain``, this resets Dynamo's caches before and after, so
    already-compiled models recompile on their next call.
    """
    records: dict[str, CompiledGraph] = {}

    def keep(record: CompiledGraph) -> None:
        # Keyed by compile id: Dynamo may call the backend twice for one frame (dynamic shapes).
        records[record.compile_id or str(len(records))] = record

    torch._dynamo.reset()
    try:
        with observe_compilations(keep), torch.no_grad():
            eager = dataclasses.replace(config, inner="eager")
            torch.compile(model, backend=backend_for(eager), dynamic=False)(*example_inputs)
    finally:
        torch._dynamo.reset()
    return list(records.values())


def backend_for(config: TernaryConfig) -> Callable[..., Any]:
    """A backend callable bound to ``config`` (what :func:`bitcompile.compile` passes to torch.compile)."""
    return functools.partial(compile_graph, config=config)
