"""Global per-tensor scales for sharded weights: one batched all-reduce for all layers.

With ``group_size="tensor"`` a layer's scale is the absmean of its whole weight. Under DDP
every rank holds the whole weight, and under FSDP2 the forward runs on the all-gathered
(unsharded) weight, so the scale ``bitcpm::ternary_linear`` computes in the forward is
already the global absmean and needs no collective ("in forward" mode).

:func:`enable_tensor_scales` switches to the torchao-style "precomputed" mode instead
(``precompute_bitnet_scale_for_fsdp``): each rank sums ``|W|`` over its *local shard* in
fp32, the sums of all layers are stacked and reduced by **one** ``all_reduce`` per step, and
the global absmean is written into a per-layer buffer that the compiled graph reads. The
scale then comes from the fp32 latent shards, not from what the all-gather delivers (with
FSDP2 mixed precision that is a bf16 copy), and it is what a future 2-bit all-gather needs:
the codes can be made before the gather only once the global scale is known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import bitcompile.ops  # noqa: F401  (registers the marker and prescaled ops)
from bitcompile.config import TernaryConfig
from bitcompile.policy import layer_skip_reason

SCALE_BUFFER = "weight_scale"


class StaleTensorScalesError(RuntimeError):
    """A weight changed since its precomputed scale was computed (manual mode)."""


class TensorScaledLinear(nn.Linear):
    """An ``nn.Linear`` whose per-tensor ternary scale is precomputed into ``weight_scale``.

    Eager (uncompiled) it is exactly ``nn.Linear``. Under ``torch.compile`` its forward ties
    the weight to the scale buffer with ``bitcpm::tensor_scale_marker``, and the ``bitcpm``
    backend rewrites it into ``bitcpm::ternary_linear_prescaled``.
    """

    weight_scale: Tensor
    computes_plain_linear = True  # policy.forward_override_reason: the marker only tags the weight

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        if torch.compiler.is_compiling():
            weight = torch.ops.bitcpm.tensor_scale_marker(weight, self.weight_scale)
        return F.linear(input, weight, self.bias)


def _tied(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def enable_tensor_scales(
    model: nn.Module, options: Mapping[str, Any] | TernaryConfig | None = None, *, auto: bool = True
) -> list[str]:
    """Switch the model's per-tensor layers to precomputed global scales; returns their names.

    Call it on the plain model, before ``torch.compile`` and before or after
    ``fully_shard`` / DDP (it only changes the class of ``nn.Linear`` leaves and adds a
    non-persistent fp32 buffer, so checkpoints are unchanged). ``options`` must have
    ``group_size="tensor"``; its ``exclude`` / ``include`` / ``min_features`` pick the same
    layers the compiler rewrites.

    With ``auto=True`` a forward pre-hook on ``model`` calls :func:`precompute_tensor_scales`
    before every forward: one all-reduce per forward (per micro-batch under gradient
    accumulation). With ``auto=False`` call ``precompute_tensor_scales(model)`` yourself
    after every ``optimizer.step()`` (and once before the first step), as with torchao's
    ``precompute_bitnet_scale_for_fsdp``; the pre-hook then only checks that no weight
    changed since (a few integer comparisons, no collective) and raises
    :class:`StaleTensorScalesError` instead of training on stale scales.
    """
    config = TernaryConfig.from_options(options if options is not None else {"group_size": "tensor"})
    if config.group_size.kind != "tensor":
        raise ValueError(
            f"enable_tensor_scales needs group_size='tensor', got group_size={config.group_size.option!r}: "
            "per-row and per-group scales are local to a row of the weight and need no collective"
        )
    if getattr(model, "_bitcpm_tensor_scales", None) is not None:
        raise RuntimeError("enable_tensor_scales was already called on this model")
    tied = _tied(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, TensorScaledLinear):
            names.append(name)
            continue
        if not isinstance(module, nn.Linear) or "weight" not in module._parameters:
            continue
        weight = module.weight
        shared = "another module (tied)" if id(weight) in tied else None
        if layer_skip_reason(name, weight, module.out_features, module.in_features, config, shared) is not None:
            continue
        if type(module) is not nn.Linear:
            raise TypeError(
                f"enable_tensor_scales: {name!r} is a {type(module).__name__}, not a plain nn.Linear; call "
                "enable_tensor_scales before fully_shard is applied to individual linear layers"
            )
        module.__class__ = TensorScaledLinear
        module.register_buffer(
            SCALE_BUFFER, torch.ones((), dtype=torch.float32, device=_local(weight).device), persistent=False
        )
        names.append(name)
    model._bitcpm_tensor_scales = _State(names, auto)
    model.register_forward_pre_hook(_pre_forward)
    return names


class _State:
    def __init__(self, names: list[str], auto: bool) -> None:
        self.names, self.auto = names, auto
        self.versions: dict[str, tuple[int, int]] = {}
        self.collectives = 0  # all-reduces issued so far (the tests and benchmark count them too)
        self.two_bit = False  # enable_two_bit_all_gather: FSDP2 gathers these layers as 2-bit codes


def _local(weight: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return weight.to_local() if isinstance(weight, DTensor) else weight


def _shard_group(weight: Tensor) -> dist.ProcessGroup | None:
    """The process group over which ``weight`` is sharded (None when every rank holds all of it)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(weight, DTensor):
        return None
    sharded = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard)]
    if any(not isinstance(p, (Shard, Replicate)) for p in weight.placements) or len(sharded) > 1:
        raise NotImplementedError(
            f"precomputed tensor scales support weights sharded along one mesh dimension (FSDP2 / HSDP), "
            f"got placements {weight.placements}"
        )
    return weight.device_mesh.get_group(sharded[0]) if sharded else None


def _version(weight: Tensor) -> tuple[int, int]:
    return id(weight), weight._version


@torch.no_grad()
def precompute_tensor_scales(model: nn.Module) -> int:
    """Write the global absmean of every precomputed-scale layer's weight; returns the collectives issued.

    One ``all_reduce`` per process group the weights are sharded over (one for FSDP2 and
    HSDP), zero when no weight is sharded (single process, DDP). Call it outside the
    forward (after ``optimizer.step()``), when FSDP2 holds its sharded parameters.
    """
    state: _State | None = getattr(model, "_bitcpm_tensor_scales", None)
    if state is None:
        raise RuntimeError("call bitcompile.distributed.enable_tensor_scales(model, ...) first")
    modules = [model.get_submodule(name) for name in state.names]
    if not modules:
        return 0
    weights = [m.weight for m in modules]
    groups = [_shard_group(w) for w in weights]
    # fp32 sums of |W| over what this rank holds. A weight every rank holds whole contributes
    # 1/world of its sum, so one SUM per shard group gives every weight's global sum.
    sharded = list(dict.fromkeys(g for g in groups if g is not None))
    sums = torch.stack([_local(w).float().abs().sum() for w in weights])
    issued = 0
    for group in sharded:
        idx = [i for i, g in enumerate(groups) if g is group or (g is None and group is sharded[0])]
        size = dist.get_world_size(group)
        index = torch.tensor(idx, device=sums.device)
        divisors = torch.tensor([1.0 if groups[i] is not None else float(size) for i in idx], device=sums.device)
        part = sums.index_select(0, index) / divisors
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        sums.index_copy_(0, index, part)
        issued += 1
    numels = torch.tensor([float(w.numel()) for w in weights], device=sums.device, dtype=torch.float64)
    means = (sums.double() / numels).float()
    for module, mean in zip(modules, means.unbind()):
        module.weight_scale.copy_(mean)
    state.versions = {name: _version(w) for name, w in zip(state.names, weights)}
    for weight in weights:  # a 2-bit all-gather (two_bit_gather.TernaryGatherWeight) may now make codes
        local = _local(weight)
        if hasattr(local, "mark_scale_fresh"):
            local.mark_scale_fresh()
    state.collectives += issued
    return issued


@torch._dynamo.disable
def _pre_forward(model: nn.Module, args: Any) -> None:
    state: _State = model._bitcpm_tensor_scales
    if state.auto:
        precompute_tensor_scales(model)
        return
    if not state.versions:
        raise StaleTensorScalesError(
            "precomputed tensor scales were never computed: call "
            "bitcompile.distributed.precompute_tensor_scales(model) before the first forward"
        )
    for name in state.names:
        weight = model.get_submodule(name).weight
        identity, version = state.versions[name]
        # Under FSDP2 the root's own layers may already hold their unsharded copy here; skip those.
        if id(weight) == identity and weight._version != version:
            raise StaleTensorScalesError(
                f"the weight of {name!r} changed after precompute_tensor_scales(model) ran: call it after every "
                "optimizer.step() (or enable_tensor_scales(..., auto=True)) so the ternary scales match the weights"
            )


def tensor_scale_mode(model: nn.Module | None, options: Mapping[str, Any] | TernaryConfig | None = None) -> str:
    """Which scale mode a model trains with: ``per-row``, ``per-group``, ``per-tensor (in forward)``,
    ``per-tensor (precomputed)``."""
    config = TernaryConfig.from_options(options)
    if config.group_size.kind == "row":
        return "per-row"
    if config.group_size.kind == "group":
        return "per-group"
    if model is not None and getattr(model, "_bitcpm_tensor_scales", None) is not None:
        return "per-tensor (precomputed)"
    return "per-tensor (in forward)"
