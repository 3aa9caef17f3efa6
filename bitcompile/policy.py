"""Which layers become ternary: the one decision rule shared by the compile passes and ``pack``.

Graph passes add what only a graph can tell (is the weight a parameter, who else reads
it) and then ask :func:`layer_skip_reason`; ``bitcompile.pack`` asks the same function
about ``nn.Linear`` modules, so a model packs exactly the layers the compiler rewrites.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from bitcompile.config import TernaryConfig


def matching_pattern(path: str, patterns: Sequence[str]) -> str | None:
    """First pattern matching the full path or a dotted suffix of it (``"down_proj"`` matches ``a.down_proj``)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern):
            return pattern
    return None


def layer_skip_reason(
    name: str,
    weight: torch.Tensor,
    out_features: int,
    in_features: int,
    config: TernaryConfig,
    shared_with: str | None = None,
) -> str | None:
    """Why the layer ``name`` stays float, or None when it becomes ternary."""
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, only 2-D weights are ternarized"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if out_features == 0 or in_features == 0:
        return f"weight is empty ({out_features}x{in_features}): nothing to quantize"
    if (pattern := matching_pattern(name, config.exclude)) is not None:
        return f"excluded by pattern {pattern!r}"
    if config.include and matching_pattern(name, config.include) is None:
        return f"not matched by include patterns {list(config.include)}"
    if shared_with:
        return f"weight is shared with {shared_with}"
    if min(out_features, in_features) < config.min_features:
        return f"smaller than min_features={config.min_features} ({out_features}x{in_features})"
    return None
