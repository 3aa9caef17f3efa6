"""Distributed ternary training on torch.distributed (DDP, FSDP2, TP); see docs/distributed.md.

The ``bitcpm`` backend needs nothing special under DDP or FSDP2: the compiled graph sees the
whole weight (DDP replicas, FSDP2's all-gathered copy), so per-row, per-group and per-tensor
scales are the global ones with no extra collective. This module adds:

- :func:`check_options`: every rank checks it has the same bitcpm options (fails fast).
- :func:`enable_tensor_scales` / :func:`precompute_tensor_scales`: torchao-style precomputed
  global per-tensor scales from the sharded fp32 weights, one batched all-reduce per step.
- :func:`compile_module`: per-block compilation that also works for a bare ``nn.Linear`` head.
- :func:`count_collectives`: how many collectives a step issues, and their bytes (profiler based).
- :func:`megatron_plan` / :func:`check_plan`: tensor parallelism with
  ``torch.distributed.tensor.parallel`` (the backend rewrites DTensor layers itself, see
  :mod:`bitcompile.passes.tensor_parallel`); every rank checks it has the same plan.
- :func:`enable_two_bit_all_gather`: FSDP2 all-gathers ternary codes instead of float weights.
"""

from __future__ import annotations

from bitcompile.distributed.collectives import CollectiveCount, count_collectives
from bitcompile.distributed.compile import compile_module
from bitcompile.distributed.options import OptionsMismatchError, check_options
from bitcompile.distributed.two_bit_gather import TernaryGatherWeight, enable_two_bit_all_gather
from bitcompile.distributed.tensor_parallel import PlanMismatchError, check_plan, describe_plan, megatron_plan
from bitcompile.distributed.scales import (
    StaleTensorScalesError,
    TensorScaledLinear,
    enable_tensor_scales,
    precompute_tensor_scales,
    tensor_scale_mode,
)

__all__ = [
    "CollectiveCount",
    "OptionsMismatchError",
    "PlanMismatchError",
    "StaleTensorScalesError",
    "TensorScaledLinear",
    "TernaryGatherWeight",
    "check_options",
    "check_plan",
    "compile_module",
    "count_collectives",
    "describe_plan",
    "enable_tensor_scales",
    "enable_two_bit_all_gather",
    "megatron_plan",
    "precompute_tensor_scales",
    "tensor_scale_mode",
]
