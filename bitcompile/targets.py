"""The target registry: each place the ``bitcpm`` ops can run is one :class:`Target`.

A target names its parts: its kernels (a :class:`~bitcompile.kernels.contract.TernaryKernels`,
imported on first use), whether it can run here, which inputs ``target="auto"`` gives it, and
its lowering (planning on the Dynamo graph, lowering after AOT; None when the ``bitcpm`` ops
stay opaque calls and the inner compiler takes the whole graph). ``TernaryConfig``'s
validation, the CLI's ``--target`` choices, :func:`get_kernel` and the backend all read this
registry, so adding a target is one :func:`register_target` call::

    register_target(Target(
        name="cuda",
        summary="CUDA kernels",
        kernels_module="bitcompile.kernels.cuda",
        selects=lambda inputs: any(getattr(t, "is_cuda", False) for t in inputs),
        auto_rank=0,
    ))

Parts that live above this module (a lowering pass) are named by import path, as entry points
are, so that the config can list targets without importing the compiler.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bitcompile.kernels.contract import TernaryKernels, missing_functions

if TYPE_CHECKING:
    import torch.fx

    from bitcompile.config import TernaryConfig

log = logging.getLogger(__name__)

#: The target that picks one of the registered targets from the example inputs.
AUTO = "auto"


class Lowering(Protocol):
    """A target's own passes around the inner compiler, for one Dynamo graph.

    The backend calls :meth:`plan` on the rewritten Dynamo graph, then hands each post-AOT
    forward graph to :meth:`lower` before :attr:`graph_compiler` (or the inner compiler)
    compiles it.
    """

    #: compiles each post-AOT graph instead of the inner compiler (torchair on an NPU), or None
    graph_compiler: Callable[..., Any] | None
    #: what the report calls the device of the lowered graphs ("Ascend")
    label: str

    def plan(self, gm: torch.fx.GraphModule, decisions: Sequence[Any]) -> list[Any]:
        """Route layers on the Dynamo graph; returns the graph inputs a ``FrozenWeightGuard`` must watch."""
        ...

    def lower(self, gm: torch.fx.GraphModule, decompositions: dict | None) -> bool:
        """Lower one post-AOT forward graph; True when it holds target-specific nodes to report."""
        ...


#: ``(example_inputs, config) -> Lowering`` for one Dynamo graph
LoweringFactory = Callable[[Sequence[Any], "TernaryConfig"], Lowering]


def _import(path: str) -> Any:
    """``"package.module"`` or ``"package.module:attribute"``, imported."""
    module, _, attribute = path.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def _always(example_inputs: Sequence[Any]) -> bool:
    return True


def _never_unavailable() -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """One place the ``bitcpm`` ops run, with its named parts.

    Attributes:
        name: the ``target=`` option value and the ``kernel`` argument of the ``bitcpm`` ops.
        summary: one line for ``--help`` and the docs.
        kernels_module: import path of its :class:`TernaryKernels` (imported by :meth:`kernels`).
        unavailable_reason: why it cannot run in this process (None when it can); it warns
            the user (once) itself, as the kernels do that fall back.
        fallback: the target that runs instead when it is unavailable.
        auto_rank: ``target="auto"`` tries targets by increasing rank (None: never picked by auto).
        selects: for ``auto``: whether this target takes a graph with these example inputs.
        lowering: import path of its :data:`LoweringFactory`, or None (the ops stay opaque calls).
        precomputed_scales: whether its training op takes ``bitcompile.distributed``'s
            precomputed per-tensor scales (a lowering that replaces the op does not).
    """

    name: str
    summary: str
    kernels_module: str
    unavailable_reason: Callable[[], str | None] = _never_unavailable
    fallback: str | None = None
    auto_rank: int | None = None
    selects: Callable[[Sequence[Any]], bool] = _always
    lowering: str | None = None
    precomputed_scales: bool = True

    def kernels(self) -> TernaryKernels:
        """Its kernel set (imported now, checked against the contract once)."""
        module = _import(self.kernels_module)
        if self.kernels_module not in _checked:
            missing = missing_functions(module)
            if missing:
                raise TypeError(f"target {self.name!r}: {self.kernels_module} lacks {', '.join(missing)}")
            _checked.add(self.kernels_module)
        return module

    def available(self) -> bool:
        """Whether it can run here (else :attr:`fallback` runs)."""
        return self.unavailable_reason() is None

    def make_lowering(self, example_inputs: Sequence[Any], config: TernaryConfig) -> Lowering | None:
        """Its :class:`Lowering` for one Dynamo graph, or None."""
        return None if self.lowering is None else _import(self.lowering)(example_inputs, config)


_checked: set[str] = set()
_registry: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add ``target`` to the registry (the config, the CLI and the backend see it at once)."""
    if target.name == AUTO or target.name in _registry:
        why = "reserved" if target.name == AUTO else "already registered"
        raise ValueError(f"target name {target.name!r} is {why}")
    if target.fallback is not None and target.fallback not in _registry:
        raise ValueError(f"target {target.name!r}: register its fallback {target.fallback!r} first")
    _registry[target.name] = target
    return target


def targets() -> tuple[Target, ...]:
    """Every registered target, in registration order."""
    return tuple(_registry.values())


def target_names() -> tuple[str, ...]:
    """The ``target=`` values: ``"auto"`` and every registered target's name."""
    return (AUTO, *_registry)


def get_target(name: str) -> Target:
    """The target registered under ``name``."""
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"unknown bitcpm target {name!r}; available: {', '.join(_registry)}") from None


def get_kernel(name: str) -> TernaryKernels:
    """The kernels of the target registered under ``name`` (the ``kernel`` argument of the ops)."""
    if name not in _registry:
        raise ValueError(f"unknown bitcpm kernel {name!r}; available: {', '.join(_registry)}")
    return _registry[name].kernels()


def _runnable(target: Target) -> Target:
    """``target``, or the first available target of its fallback chain."""
    while (reason := target.unavailable_reason()) is not None:
        if target.fallback is None:
            raise RuntimeError(f"bitcpm target {target.name!r} cannot run here: {reason}")
        log.debug("bitcpm target %r runs as %r: %s", target.name, target.fallback, reason)
        target = _registry[target.fallback]
    return target


def resolve_target(target: str, example_inputs: Iterable[Any] = ()) -> str:
    """The registered target that runs for a config's ``target`` (``"auto"`` chooses by the inputs)."""
    if target == AUTO:
        inputs = list(example_inputs)
        ranked = sorted((t for t in _registry.values() if t.auto_rank is not None), key=lambda t: t.auto_rank)
        chosen = next((t for t in ranked if t.selects(inputs)), None)
        if chosen is None:
            raise ValueError("no registered target takes these inputs for target='auto'")
        return _runnable(chosen).name
    return _runnable(get_target(target)).name


# ---- the built-in targets ----


def on_npu(example_inputs: Iterable[Any]) -> bool:
    """Whether any example input is a tensor on an Ascend NPU."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "npu" for t in example_inputs)


def _cpu_unavailable() -> str | None:
    from bitcompile.kernels.cpu import library

    # handle() warns once, naming the reason, as every cpu kernel does when it falls back
    return None if library.handle() is not None else library.UNAVAILABLE_REASON


register_target(Target("reference", "pure-PyTorch kernels (the oracle)", "bitcompile.kernels.reference", auto_rank=2))
register_target(
    Target(
        "cpu", "C kernels (AVX-512 VNNI / AVX2 / portable), loaded with ctypes", "bitcompile.kernels.cpu",
        unavailable_reason=_cpu_unavailable, fallback="reference", auto_rank=1,
    )
)  # fmt: skip
register_target(
    Target(
        "cann", "Ascend NPUs through torch_npu (its CPU emulator when torch_npu is absent)", "bitcompile.kernels.cann",
        auto_rank=0, selects=on_npu, lowering="bitcompile.passes.lower_cann:CannLowering", precomputed_scales=False,
    )
)  # fmt: skip
