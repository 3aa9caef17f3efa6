"""Per-block compilation for sharded training.

Under FSDP2 each ``fully_shard``-ed block runs its all-gather in hooks that Dynamo does not
trace, so a ``torch.compile`` of the root breaks its graph at every block (and gives up on
a root forward that loops over blocks). The usual recipe compiles each block instead. One
trap: ``module.compile()`` of a bare ``torch.nn`` layer (an ``nn.Linear`` output head)
compiles nothing, because Dynamo skips frames that live in ``torch.nn``; such a head would
silently stay float. :func:`compile_module` handles both cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitcompile.config import TernaryConfig


def compile_module(module: nn.Module, options: Mapping[str, Any] | TernaryConfig | None = None, **kwargs: Any) -> nn.Module:
    """Compile ``module`` in place with the ``bitcpm`` backend; returns it (state_dict keys unchanged).

    A class defined in ``torch.nn`` gets its bound ``forward`` compiled (its hooks still run,
    eagerly); any other module uses ``module.compile``. Extra ``kwargs`` go to ``torch.compile``.
    """
    config = TernaryConfig.from_options(options)
    # include/exclude name layers of the whole model, not of this block: no "matches nothing" warning
    module.bitcompile_compiled_block = True
    if type(module).__module__.startswith("torch.nn."):
        module.forward = torch.compile(module.forward, backend="bitcpm", options=config.to_options(), **kwargs)
    else:
        module.compile(backend="bitcpm", options=config.to_options(), **kwargs)
    return module
