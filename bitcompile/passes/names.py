"""Module paths the user knows, recovered from Dynamo's source names.

Dynamo names parameters after how it reached them, e.g.
``L['self']._modules['layers']._modules['3']._modules['mlp']._parameters['weight']``, and
records each call's module stack as ``L['self'].layers.3.mlp``. Reports and errors must
say ``layers.3.mlp.down_proj``, so both forms are turned back into dotted paths.
"""

from __future__ import annotations

import re

import torch.fx

# The compiled module itself: L['self'], or L['args'][0] when its forward is wrapped in *args,
# or L['fn'].__self__ when a bound ``module.forward`` was compiled (distributed.compile_module).
_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\](?:\[\d+\])?(?:\.__self__)?")
_TOKEN = re.compile(
    r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]"  # ._modules['x']
    r"|\.([A-Za-z0-9_]+)"  # .attr or .3 (module stack paths)
    r"|\[['\"]([^'\"]+)['\"]\]"  # ['key']
    r"|\[(-?\d+)\]"  # [3]
)


def dotted_path(source_name: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` → ``fc.weight``.

    Unparseable pieces are kept verbatim rather than dropped, so a name is never lost.
    """
    rest = _ROOT.sub("", source_name, count=1)
    parts: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(rest):
        if match.start() != pos:
            parts.append(rest[pos : match.start()])
        parts.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    if pos != len(rest):
        parts.append(rest[pos:])
    return ".".join(parts)


def placeholder_path(node: torch.fx.Node) -> str | None:
    """Dotted path of a graph input (parameter, buffer or user input) from its Dynamo source."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    return dotted_path(source.name)


def calling_module(node: torch.fx.Node, *, within_model: bool = False) -> tuple[str, type] | None:
    """Innermost module (dotted path, class) whose forward made this call, if Dynamo recorded it.

    ``within_model=True`` skips modules reached through a global rather than through the
    compiled model (``G['...'].apply_rotary_pos_emb``: transformers wraps functions such as
    the rotary embedding in a module when the ``kernels`` package is installed): their ops
    belong to the model's module that called them.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entries = list(stack.values())
    if within_model:
        local = [entry for entry in entries if str(entry[0]).startswith("L[")]
        if local and local[-1] is not entries[-1]:
            entries = local
    path, cls = entries[-1]
    return dotted_path(path), cls


def attribute_value(node: torch.fx.Node) -> object:
    """What a ``get_attr`` node names on its graph's owning module (None where a part is missing)."""
    obj: object = node.graph.owning_module
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj
