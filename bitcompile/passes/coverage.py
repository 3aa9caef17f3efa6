"""Say so when a compiled model is not what its options asked for.

Two silent failures are turned into one :class:`~bitcompile.config.BitcompileWarning` each:

- a compiled module whose training graphs (grad enabled, parameters that require grad) hold
  no ternary layer, so it trains in float; the warning lists each layer's reason. A frame
  that a graph break split is judged when its last graph compiles;
- an ``include`` / ``exclude`` pattern that matches nothing in the compiled module (a typo
  in ``exclude=["lm_haed"]`` would otherwise make the head ternary without a word).

Patterns are matched against the module tree of the frame's ``self`` (every module and
parameter path), not against one graph's layers, so a graph break never makes a pattern
look unused; a block compiled on its own by ``distributed.compile_module`` is skipped (the
patterns name layers of the whole model). Python's warning filter shows each message once per process.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from bitcompile.config import BitcompileWarning, TernaryConfig
from bitcompile.passes.discover import LayerDecision
from bitcompile.policy import unmatched_patterns


#: Per compiled module: (layer, rewritten, reason) of every training graph seen so far.
_layers_seen: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, bool, str]]] = weakref.WeakKeyDictionary()


def _frame_root(gm: torch.fx.GraphModule) -> tuple[nn.Module | None, bool]:
    """The module whose forward Dynamo is compiling (the ``self`` behind ``L['self']``), and whether
    this graph is a resumed piece of a frame that broke."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # not inside Dynamo (a graph handed over directly): nothing to look at
        return None, False
    if tx is None:
        return None, False
    resumed = tx.f_code.co_name.startswith("torch_dynamo_resume_in_")
    for node in gm.graph.nodes:
        source = getattr(node.meta.get("grapharg"), "source", None)
        while source is not None and hasattr(source, "base"):
            source = source.base
        module = tx.f_locals.get(getattr(source, "local_name", None)) if source is not None else None
        module = getattr(module, "__self__", module)  # a compiled bound ``module.forward``
        if isinstance(module, nn.Module):
            return module, resumed
    return None, resumed


def _is_training_graph(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, nn.Parameter) and t.requires_grad for t in example_inputs)


def _under_ddp() -> bool:
    """DDP's optimizer hands the backend bucket-sized pieces of one graph: no piece is the whole model."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def check_coverage(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    decisions: Sequence[LayerDecision],
    config: TernaryConfig,
    graph_break_reason: str | None,
) -> None:
    """Warn about a training graph with zero ternary layers and about patterns that match nothing."""
    root, resumed = _frame_root(gm)
    owner = type(root).__name__ if root is not None else "the compiled function"
    whole_frame = graph_break_reason is None and not resumed and not _under_ddp()
    if (config.exclude or config.include) and not getattr(root, "bitcompile_compiled_block", False):
        if root is not None:
            names = [n for n, _ in root.named_modules() if n]
            names += [n.removesuffix(".weight") for n, _ in root.named_parameters(remove_duplicate=False)]
        else:
            names = [d.name for d in decisions] if whole_frame else None
        for option, pattern in unmatched_patterns(config, names) if names is not None else ():
            warnings.warn(
                f"bitcpm: {option} pattern {pattern!r} matches no module or parameter of {owner}; check its spelling",
                BitcompileWarning,
                stacklevel=2,
            )
    if not _is_training_graph(example_inputs) or _under_ddp():
        return
    # A frame that broke compiles piece by piece: judge the model once its last piece is in.
    seen = _layers_seen.setdefault(root, []) if root is not None else []
    seen.extend((d.name, d.rewritten, d.reason) for d in decisions)
    if graph_break_reason is not None or any(rewritten for _, rewritten, _ in seen):
        return
    block = getattr(root, "bitcompile_compiled_block", False)
    if block and seen and all(reason.startswith("excluded by pattern") for _, _, reason in seen):
        return  # a block the user excluded on purpose (an output head compiled on its own)
    if seen:
        reasons = "; ".join(f"{name}: {reason}" for name, _, reason in seen[:4]) + ("; ..." if len(seen) > 4 else "")
        message = (
            f"bitcpm: a training graph of {owner} has {len(seen)} linear layer(s) and none is ternary, "
            f"so it trains in float ({reasons})"
        )
    elif not resumed or root is not None:
        message = (
            f"bitcpm: a training graph of {owner} has no linear layer (F.linear / matmul with an nn.Parameter "
            "weight), so nothing in it trains ternary"
        )
    else:
        return  # the last piece of a frame we cannot tie to a module: no evidence about the rest
    warnings.warn(message, BitcompileWarning, stacklevel=2)
