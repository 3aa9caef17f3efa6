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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx

import bitcompile.ops  # noqa: F401  (registers torch.ops.bitcpm.*)
from bitcompile.config import TernaryConfig, TernaryConfigError
from bitcompile.passes.precomputed_scales import strip_scale_markers
from bitcompile.passes.coverage import check_coverage
from bitcompile.passes.discover import LayerDecision, discover
from bitcompile.passes.freeze_pack import FrozenWeightGuard, check_can_freeze, freeze_pack
from bitcompile.passes.experts import rewrite_experts
from bitcompile.passes.describe import NODE_ROLES, GraphNode, describe_graph
from bitcompile.passes.tensor_parallel import TensorParallelError
from bitcompile.passes.ternary_rewrite import ternary_rewrite
from bitcompile.targets import Lowering, get_target, resolve_target

log = logging.getLogger(__name__)

__all__ = [
    "NODE_ROLES", "BackendOptionsError", "CompiledGraph", "GraphNode", "backend_for", "bitcpm", "capture", "compile_graph",
    "observe_compilations", "quiet_torch_error_logs",
]  # fmt: skip

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


def _graph_break_reason(gm: torch.fx.GraphModule) -> str | None:
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    return str(reason.reason)


def _mode_patches(mode: str | None) -> dict[str, Any]:
    from torch._inductor import list_mode_options

    return list_mode_options(mode) if mode not in (None, "default") else {}


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inner: str, mode: str | None):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=_mode_patches(mode))


def _lower_and_compile(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inner: str, mode: str | None, lowering: Lowering
) -> tuple[Callable[..., Any], list[str]]:
    """Compile through AOTAutograd, handing each post-AOT forward graph to ``lowering`` first.

    The graphs go to the lowering's own graph compiler when it has one (torchair on an NPU),
    else to inductor (with its decompositions applied to the lowered nodes) or, for
    ``aot_eager`` / ``eager``, to plain execution. Returns the compiled callable and the code
    of every graph the lowering changed (for the report).
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    lowered: list[str] = []

    def lower(g: torch.fx.GraphModule, decompositions: dict | None = None) -> None:
        if lowering.lower(g, decompositions):
            lowered.append(g.code)

    if lowering.graph_compiler is None and inner == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table

        def inner_compile(g, ex, **kwargs):
            lower(g, select_decomp_table())
            return compile_fx_inner(g, ex, **kwargs)

        compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=_mode_patches(mode))
    else:
        base = lowering.graph_compiler or (lambda g, ex: make_boxed_func(g.forward))

        def forward_compiler(g, ex):
            lower(g)
            return base(g, ex)

        compiled = aot_autograd(fw_compiler=forward_compiler, bw_compiler=base, inference_compiler=forward_compiler)(
            gm, example_inputs
        )
    return compiled, lowered


def compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: TernaryConfig,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Rewrite one Dynamo graph for ``config`` and compile it with ``config.inner``.

    The target (:mod:`bitcompile.targets`) names the kernels the rewritten ops call and, when it
    has one, the lowering that plans its layers here and lowers each post-AOT graph.
    """
    target = get_target(resolve_target(config.target, example_inputs))
    kernel = target.name
    # Only explain/inspect (observers) need the graph as it was; skip the work otherwise.
    before = gm.code if _observers else ""
    existing = set(gm.graph.nodes) if _observers else set()
    # Precomputed per-tensor scales (bitcompile.distributed): weight node -> scale node.
    tensor_scales = strip_scale_markers(gm)
    decisions = discover(gm, example_inputs, config)
    check_coverage(gm, example_inputs, decisions, config, _graph_break_reason(gm))
    frozen = []
    if config.freeze:
        check_can_freeze()
        frozen = freeze_pack(gm, example_inputs, decisions, config, kernel)
        replaced = len(frozen)
    else:
        try:
            replaced = ternary_rewrite(gm, decisions, config, kernel, tensor_scales if target.precomputed_scales else None)
        except TensorParallelError as error:  # a sharding the scales cannot follow: one line, not Dynamo's wrapper
            raise BackendOptionsError(str(error)) from None
        replaced += rewrite_experts(gm, decisions, config, kernel)
    log.info("bitcpm: rewrote %d of %d linear-like layers", replaced, len(decisions))

    def notify(after: str) -> None:
        if not _observers:
            return
        compile_id = str(torch._guards.CompileContext.current_compile_id() or "")
        record = CompiledGraph(
            compile_id,
            _graph_break_reason(gm),
            before,
            after,
            decisions,
            kernel,
            nodes=describe_graph(gm, example_inputs, decisions, existing),
            replaced={d.site.node.name: d.name for d in decisions if d.rewritten and d.site is not None},
            graph_module=gm,
            example_inputs=tuple(example_inputs),
        )
        for callback in list(_observers):
            callback(record)

    lowering = target.make_lowering(example_inputs, config)
    if lowering is None:
        notify(gm.code)
        compiled = _inner_compile(gm, example_inputs, config.inner, mode)
    else:
        # The target's plan, then AOT with its post-AOT lowering; the report shows the lowered graphs too.
        watched = lowering.plan(gm, decisions)
        compiled, lowered = _lower_and_compile(gm, example_inputs, config.inner, mode, lowering)
        header = f"\n# ---- lowered for {lowering.label} (post-AOT forward graph) ----\n"
        notify(gm.code + "".join(header + code for code in lowered))
        if watched:
            compiled = FrozenWeightGuard(compiled, watched)
    return FrozenWeightGuard(compiled, frozen) if frozen else compiled


try:  # what Dynamo re-raises from a backend unwrapped (BackendCompilerFailed is one)
    from torch._dynamo.exc import ShortenTraceback as _DynamoReraises
except ImportError:  # another torch: the error then arrives wrapped, with ours as its message
    _DynamoReraises = Exception


class BackendOptionsError(TernaryConfigError, _DynamoReraises):
    """A bad ``torch.compile(..., backend="bitcpm", options=...)``, raised to the caller as is.

    ``torch.compile`` stores ``options`` without handing them to the backend; Dynamo passes
    them on its first backend call, i.e. at the model's first call, and wraps anything a
    backend raises in ``BackendCompilerFailed``, except its own ``ShortenTraceback``
    errors. Being one of those too, this error reaches the caller as a
    :class:`TernaryConfigError` with its one-line message. (To get the error at
    construction time, build the config in Python: ``bitcompile.compile(model, TernaryConfig(...))``.)
    """

    def __init__(self, message: str) -> None:
        TernaryConfigError.__init__(self, message)
        self.message = message
        self.first_useful_frame = None  # ShortenTraceback: no frames of ours to cut

    def __str__(self) -> str:
        return self.message  # Dynamo appends "Set TORCHDYNAMO_VERBOSE=1 ..." to args; it does not apply here


def bitcpm(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The ``backend="bitcpm"`` entry point: ``options`` are parsed into a :class:`TernaryConfig`.

    Raises:
        BackendOptionsError: (a :class:`TernaryConfigError`) at the first call of the compiled
            model when ``options`` are invalid.
    """
    try:
        config = TernaryConfig.from_options(options)
    except TernaryConfigError as error:
        raise BackendOptionsError(str(error)) from None
    return compile_graph(gm, example_inputs, config, mode=mode)


#: Loggers that print, as ~20 lines of traceback, an error that the exception raised next carries too
#: (fake_tensor: "failed while attempting to run meta for aten.mm" on mismatched example inputs).
DUPLICATE_ERROR_LOGGERS = ("torch._subclasses.fake_tensor", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet_torch_error_logs(names: Sequence[str] = DUPLICATE_ERROR_LOGGERS) -> Iterator[None]:
    """Silence the loggers ``names`` (all levels) in this block; the exceptions still propagate."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
        with observe_compilations(keep), torch.no_grad(), quiet_torch_error_logs():
            eager = dataclasses.replace(config, inner="eager")
            torch.compile(model, backend=backend_for(eager), dynamic=False)(*example_inputs)
    finally:
        torch._dynamo.reset()
    return list(records.values())


def backend_for(config: TernaryConfig) -> Callable[..., Any]:
    """A backend callable bound to ``config`` (what :func:`bitcompile.compile` passes to torch.compile)."""
    return functools.partial(compile_graph, config=config)
