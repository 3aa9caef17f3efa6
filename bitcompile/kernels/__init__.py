"""Kernels behind the ``bitcpm`` ops. ``reference`` is the oracle every other kernel is tested against.

Each kernel set implements :class:`bitcompile.kernels.contract.TernaryKernels`; which one a
target runs is the target registry's business (:mod:`bitcompile.targets`).
"""

from __future__ import annotations

from typing import Any

# for BC: these moved to bitcompile.targets (the registry); resolved lazily because that module
# sits above this package and imports it.
_MOVED_TO_TARGETS = {"get_kernel": "get_kernel", "resolve_target": "resolve_target", "KERNEL_NAMES": None}


def __getattr__(name: str) -> Any:
    if name not in _MOVED_TO_TARGETS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from bitcompile import targets

    if name == "KERNEL_NAMES":
        return tuple(t.name for t in targets.targets())
    return getattr(targets, _MOVED_TO_TARGETS[name])
