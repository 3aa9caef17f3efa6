"""``pack(model, example_inputs=...)``: pack exactly the layers the compiler makes ternary.

Why: some facts that decide whether a layer may be ternary exist only in the forward: a
layer called twice (``fc(relu(fc(x)))``), a weight that other code also reads. The compiler
sees them in the Dynamo graph and keeps such layers float; a module tree cannot show them.
So ``pack`` runs the model once through the compiler's own capture (``backend.capture``:
Dynamo + ``passes.discover``, no grad, model unchanged) and packs a layer only if the
compiler made every call of it ternary, from inside the layer's own forward.

It sits above ``backend`` in the layer order (docs/architecture.md), with ``pack``; the import
of ``backend`` is lazy only so that ``import bitcompile`` does not load Dynamo.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from bitcompile.config import BitcompileWarning, TernaryConfig
from bitcompile.passes.discover import LayerDecision
from bitcompile.passes.names import calling_module
from bitcompile.runtime.module_tree import linear_view

_LAYER_KINDS = ("linear", "matmul", "addmm")


def _caller(decision: LayerDecision) -> str | None:
    """Dotted path of the module whose forward made the call (None if Dynamo did not record it)."""
    module = calling_module(decision.site.node) if decision.site is not None else None
    return module[0] if module else None


def follow_compiler(
    model: nn.Module,
    plan: list,
    config: TernaryConfig,
    example_inputs: Sequence[Any],
    parameter_names: dict[int, list[str]],
) -> None:
    """Turn ``plan`` (``PackDecision`` rows, edited in place) into the compiler's decisions on ``example_inputs``."""
    from bitcompile.backend import capture  # lazy: the backend imports Dynamo, `import bitcompile` must not

    if not isinstance(example_inputs, (tuple, list)):
        kind = type(example_inputs).__name__
        raise TypeError(f"pack: example_inputs must be a tuple or list of model inputs, got {kind}")
    records = capture(model, tuple(example_inputs), config)
    decisions = [d for record in records for d in record.layers if d.kind in _LAYER_KINDS]
    by_weight: dict[str, list[LayerDecision]] = {}
    for decision in decisions:
        by_weight.setdefault(decision.weight_name, []).append(decision)
    packed_calls: set[int] = set()
    for entry in plan:
        view = linear_view(model.get_submodule(entry.name) if entry.name else model)
        calls = [d for alias in parameter_names.get(id(view.parameter), []) for d in by_weight.get(alias, [])]
        if not entry.packed:
            continue
        kept = next((d for d in calls if not d.rewritten), None)
        outside = next((d for d in calls if _caller(d) not in (entry.name, None)), None)
        if not calls:
            entry.packed = False
            entry.reason = "not called when the model ran on example_inputs: the compiler never made it ternary"
        elif kept is not None:
            entry.packed, entry.reason = False, f"the compiler keeps it float: {kept.reason}"
        elif outside is not None:
            entry.packed, entry.reason = False, (
                f"its weight is used outside its own forward (by {_caller(outside) or 'the model'}); "
                "pack replaces whole modules, so it stays float"
            )
        else:
            packed_calls.update(id(d) for d in calls)
    compiler_only = sorted({d.name for d in decisions if d.rewritten and id(d) not in packed_calls})
    if compiler_only:
        warnings.warn(
            f"pack: the compiler makes {len(compiler_only)} layer(s) ternary that pack keeps float "
            f"({', '.join(compiler_only)}): pack replaces nn.Linear / Conv1D modules called from their own "
            "forward, so the packed model computes these in float (see model.bitcompile_pack_plan)",
            BitcompileWarning,
            stacklevel=4,
        )
