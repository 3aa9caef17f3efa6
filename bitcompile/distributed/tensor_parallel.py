"""Tensor parallelism with PyTorch's own engine (``torch.distributed.tensor.parallel``).

``parallelize_module(model, mesh, plan)`` turns the planned layers' weights into DTensors;
``torch.compile(model, backend="bitcpm")`` then rewrites them into
``bitcpm::ternary_linear_sharded`` with the right scales for their sharding (see
:mod:`bitcompile.passes.tensor_parallel`). This module adds:

- :func:`megatron_plan`: the usual Llama plan (q/k/v, gate/up column-parallel; o, down
  row-parallel) for a model with ``layers.N.self_attn.*`` / ``layers.N.mlp.*`` projections;
- :func:`check_plan`: every rank compares its plan with every other rank's in one
  ``all_gather_object`` and all raise the same :class:`PlanMismatchError` when they differ
  (mismatched plans issue different collectives: without the check the ranks would wait on
  each other until the timeout, or worse, compute garbage with matching shapes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import nn

from bitcompile.config import TernaryConfigError

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


class PlanMismatchError(TernaryConfigError):
    """Ranks of one tensor-parallel group were given different parallelize plans."""


def megatron_plan(model: nn.Module) -> dict[str, Any]:
    """``{module path: ColwiseParallel() | RowwiseParallel()}`` for every decoder projection of ``model``.

    Attention and MLP are each one column-parallel → row-parallel pair, so a decoder layer needs
    two all-reduces in forward and two in backward (Megatron-LM). Embeddings, norms and the head
    stay replicated. Attention must take its head count from the local q/k/v width (TinyLlama and
    Hugging Face Llama do).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for name, _ in model.named_modules():
        if re.search(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+$", name):
            if name.endswith(COLUMN):
                plan[name] = ColwiseParallel()
            elif name.endswith(ROW):
                plan[name] = RowwiseParallel()
    if not plan:
        raise ValueError("megatron_plan: no layers.N.self_attn.* / layers.N.mlp.* projections in this model")
    return plan


def describe_plan(plan: Mapping[str, Any]) -> dict[str, str]:
    """``{module path: style and layouts}``: what :func:`check_plan` compares."""
    out = {}
    for name, style in sorted(plan.items()):
        fields = {k: repr(v) for k, v in sorted(vars(style).items()) if not k.startswith("_")}
        out[name] = f"{type(style).__name__}({', '.join(f'{k}={v}' for k, v in fields.items())})"
    return out


def check_plan(plan: Mapping[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Check every rank of ``group`` was given the same plan; raise :class:`PlanMismatchError` on all if not.

    One ``all_gather_object``; nothing when torch.distributed is not initialized. The message
    names each differing layer and each rank's style for it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = json.dumps(describe_plan(plan), sort_keys=True)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if all(other == mine for other in gathered):
        return
    decoded = [json.loads(g) for g in gathered]
    names = sorted({n for d in decoded for n in d if len({d2.get(n) for d2 in decoded}) > 1})
    shown = "; ".join(
        f"{n}: " + ", ".join(f"rank {r}={d.get(n, 'not parallelized')}" for r, d in enumerate(decoded)) for n in names[:4]
    )
    more = f" (and {len(names) - 4} more layers)" if len(names) > 4 else ""
    raise PlanMismatchError(
        f"tensor-parallel plans differ across the {len(decoded)} ranks (this is rank {dist.get_rank(group)}): "
        f"{shown}{more}. Every rank must parallelize the model with the same plan."
    )
