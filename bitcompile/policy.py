"""Which layers become ternary: the one decision rule shared by the compile passes and ``pack``.

Graph passes add what only a graph can tell (is the weight a parameter, who else reads
it) and then ask :func:`layer_skip_reason`; ``bitcompile.pack`` asks the same function
about ``nn.Linear`` modules, so a model packs exactly the layers the compiler rewrites.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from bitcompile.config import TernaryConfig


def matching_pattern(path: str, patterns: Sequence[str]) -> str | None:
    """First pattern matching the full path or a dotted suffix of it (``"down_proj"`` matches ``a.down_proj``)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern):
            return pattern
    return None


def unmatched_patterns(config: TernaryConfig, names: Iterable[str]) -> list[tuple[str, str]]:
    """``(option, pattern)`` for every ``exclude`` / ``include`` pattern that matches none of ``names``."""
    names = list(names)
    return [
        (option, pattern)
        for option in ("exclude", "include")
        for pattern in getattr(config, option)
        if not any(matching_pattern(name, [pattern]) for name in names)
    ]


def forward_override_reason(module_class: type | None) -> str | None:
    """Why an ``nn.Linear`` subclass with its own ``forward`` stays float, or None for a plain linear.

    ``pack`` replaces a whole module by a packed one, so it cannot keep what a subclass adds
    around the linear call (``super().forward(x) * 0.5``, a normalised weight). The compiler
    keeps such layers float too, so the trained model is the one ``pack`` serves.
    Classes that compute exactly ``F.linear`` declare ``computes_plain_linear = True``.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Linear):
        return None
    if module_class.forward is nn.Linear.forward or getattr(module_class, "computes_plain_linear", False):
        return None
    return (
        f"{module_class.__name__} overrides nn.Linear.forward; pack() cannot keep its forward around "
        "2-bit weights, so it stays float (compiler and pack agree)"
    )


#: Last path components of an output head (``lm_head`` in HF causal LMs, ``embed_out`` in
#: GPT-NeoX, ``classifier`` / ``score`` in HF classification models).
HEAD_NAMES = ("lm_head", "embed_out", "classifier", "score")

#: The short reasons explain shows for a role kept float (the README says where they come from).
ROLE_REASONS = {
    "head": "output head: float by default, as in BitNet/BitCPM (float_roles)",
    "router": "MoE router: float by default, as in BitNet/BitCPM (float_roles)",
}


def layer_role(name: str, module_class: type | None = None, feeds_topk: bool = False) -> str | None:
    """``"head"``, ``"router"`` or None: the roles the ternary recipes keep in higher precision.

    A router is a linear whose output reaches a ``topk`` (what the graph shows: ``feeds_topk``)
    or the weight of a module class named ``*Router`` (``MixtralTopKRouter``), or a module named
    ``router``; an output head is a module named one of :data:`HEAD_NAMES`.
    """
    last = name.rsplit(".", 1)[-1]
    class_name = module_class.__name__ if isinstance(module_class, type) else ""
    if last in HEAD_NAMES:  # first: a head whose logits a sampler's topk reads is still the head
        return "head"
    if feeds_topk or "router" in class_name.lower() or last == "router":
        return "router"
    return None


def layer_skip_reason(
    name: str,
    weight: torch.Tensor,
    out_features: int,
    in_features: int,
    config: TernaryConfig,
    shared_with: str | None = None,
    module_class: type | None = None,
    feeds_topk: bool = False,
) -> str | None:
    """Why the layer ``name`` stays float, or None when it becomes ternary.

    ``module_class``: the class of the module whose own weight this is and whose forward
    makes the call (None for a bare parameter used in a matmul).
    """
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
    if (override := forward_override_reason(module_class)) is not None:
        return override
    if shared_with:
        return f"weight is shared with {shared_with}"  # a tied head: float whatever float_roles says
    if (role := layer_role(name, module_class, feeds_topk)) in config.float_roles:
        return ROLE_REASONS[role]
    if min(out_features, in_features) < config.min_features:
        return f"smaller than min_features={config.min_features} ({out_features}x{in_features})"
    return None
