"""Fail fast when ranks disagree on the ``bitcpm`` options.

Ranks that quantize differently train different models; ranks that disagree on the scale
mode issue different collectives and would wait on each other until the process group's
timeout. :func:`check_options` makes every rank compare its options with every other rank's
in one ``all_gather_object`` and raise the same clear error on all of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import nn

from bitcompile.config import TernaryConfig, TernaryConfigError


class OptionsMismatchError(TernaryConfigError):
    """Ranks of one process group were given different bitcpm options."""


def _describe(config: TernaryConfig, model: nn.Module | None) -> dict[str, Any]:
    from bitcompile.distributed.scales import tensor_scale_mode

    out = config.to_options()
    out["scale_mode"] = tensor_scale_mode(model, config)
    return out


def check_options(
    options: Mapping[str, Any] | TernaryConfig | None,
    model: nn.Module | None = None,
    group: dist.ProcessGroup | None = None,
) -> TernaryConfig:
    """Parse ``options`` and check that every rank of ``group`` has the same ones; returns the config.

    Pass ``model`` after :func:`enable_tensor_scales` so the scale mode is compared too. One
    collective (``all_gather_object``); nothing when torch.distributed is not initialized.
    Raises :class:`OptionsMismatchError` on every rank, naming each differing key and each
    rank's value.
    """
    config = TernaryConfig.from_options(options)
    if not (dist.is_available() and dist.is_initialized()):
        return config
    mine = json.dumps(_describe(config, model), sort_keys=True)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if all(other == mine for other in gathered):
        return config
    decoded = [json.loads(g) for g in gathered]
    keys = sorted({k for d in decoded for k in d if len({json.dumps(x.get(k)) for x in decoded}) > 1})
    details = "; ".join(
        f"{key}: " + ", ".join(f"rank {r}={d.get(key)!r}" for r, d in enumerate(decoded)) for key in keys
    )
    raise OptionsMismatchError(
        f"bitcpm options differ across the {len(decoded)} ranks (this is rank {dist.get_rank(group)}): {details}. "
        "Every rank must compile the model with the same options."
    )
