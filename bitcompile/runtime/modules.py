"""Old home of the packed layers and ``pack``, kept for BC (planned removal: 0.3).

The layer classes are in :mod:`bitcompile.runtime.layers`, the module-tree helpers in
:mod:`bitcompile.runtime.module_tree`, ``pack`` / ``plan_packing`` in :mod:`bitcompile.runtime.pack`.
"""

from __future__ import annotations

from bitcompile.runtime.layers import FloatGemvLinear, PackedTernaryLinear
from bitcompile.runtime.module_tree import LinearView, linear_view, replace_submodule, weight_nbytes
from bitcompile.runtime.pack import PackDecision, PreQuantized, pack, plan_packing

__all__ = [
    "FloatGemvLinear",
    "LinearView",
    "PackDecision",
    "PackedTernaryLinear",
    "PreQuantized",
    "linear_view",
    "pack",
    "plan_packing",
    "replace_submodule",
    "weight_nbytes",
]
