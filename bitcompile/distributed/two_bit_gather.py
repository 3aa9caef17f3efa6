"""FSDP2 all-gathers ternary codes (2 bits per weight) instead of float weights.

The approach of torchao's ``bitnet_training`` (``BitNetTrainingLinearWeight``), on top of
:func:`bitcompile.distributed.enable_tensor_scales` (precomputed global per-tensor scales):

- each per-tensor layer's latent fp32 weight becomes a :class:`TernaryGatherWeight`, a
  wrapper tensor subclass FSDP2 shards like any parameter (the optimizer updates its fp32
  data in place);
- ``fsdp_pre_all_gather``: the local fp32 shard → ternary codes with the layer's global
  absmean (already in its ``weight_scale`` buffer), packed four codes per byte: the all-gather
  moves ``N * ceil(K / 4)`` bytes instead of ``N * K * 2`` (bf16) or ``* 4`` (fp32);
- ``fsdp_post_all_gather``: the unsharded parameter is ``codes * scale`` in FSDP2's
  ``param_dtype``, a plain tensor. The compiled layer is ``bitcpm::ternary_linear_prescaled``
  with the same fp32 scale, which recovers exactly these codes (``c * s / s == c``), so the
  forward, the saved tensors and the gradient are those of the float all-gather;
- the backward is unchanged: FSDP2 reduce-scatters fp32 (or ``reduce_dtype``) gradients of
  the unsharded parameter into the latent shards.

Packing (row-major, K padded with zeros to a multiple of 4), code ``c`` stored as ``c + 1``::

    codes  [a, b, c, d]  ->  byte  dd cc bb aa   (a in bits 0-1, d in bits 6-7)

A layer whose row count is not a multiple of the FSDP ranks is gathered as int8 codes (one
byte per weight, with a BitcompileWarning): FSDP2 pads such a shard and wants the all-gather
input in the padded shard's shape.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from bitcompile.distributed.scales import StaleTensorScalesError, TensorScaledLinear
from bitcompile.config import BitcompileWarning
from bitcompile.kernels.groups import EPS

aten = torch.ops.aten
_WARNED_UNEVEN: set[str] = set()

#: ops whose result is still the parameter (FSDP2 shards, pads, views and copies it with these)
_KEEP_WRAPPED = {
    aten.t.default, aten.detach.default, aten.empty_like.default, aten.new_zeros.default, aten.slice.Tensor,
    aten.view.default, aten.as_strided.default, aten._to_copy.default, aten._pin_memory.default,
    aten.split.Tensor, aten.clone.default, aten.chunk.default, aten.alias.default,
}  # fmt: skip


def pack_ternary(codes: Tensor) -> Tensor:
    """int8 codes ``(N, K)`` in {-1, 0, 1} → uint8 ``(N, ceil(K / 4))``, four codes per byte (see the module doc)."""
    n, k = codes.shape
    padded = torch.zeros((n, -(-k // 4) * 4), dtype=torch.uint8, device=codes.device)
    padded[:, :k] = (codes + 1).to(torch.uint8)
    quads = padded.view(n, -1, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack_ternary(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_ternary`: int8 ``(N, in_features)`` codes in {-1, 0, 1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & 0b11
    return (fields.reshape(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1)


class TernaryGatherWeight(Tensor):
    """A latent fp32 weight that FSDP2 all-gathers as packed ternary codes (see the module doc).

    ``_data`` is the fp32 weight (what the optimizer updates); ``_scale`` is the layer's
    ``weight_scale`` buffer (the global absmean, written by ``precompute_tensor_scales``).
    Every op other than sharding and copying returns plain tensors of ``_data``.
    """

    _data: Tensor
    _scale: Tensor

    @staticmethod
    @torch._dynamo.disable
    def __new__(cls, data: Tensor, scale: Tensor, name: str = "", fresh: dict | None = None) -> TernaryGatherWeight:
        return Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    @torch._dynamo.disable
    def __init__(self, data: Tensor, scale: Tensor, name: str = "", fresh: dict | None = None) -> None:
        self._data, self._scale, self._name = data, scale, name
        # shared by every wrapper FSDP2 and DTensor derive from this parameter (views, shards, aliases):
        # the version of the data when the scale was last computed
        self._fresh = fresh if fresh is not None else {"version": None}

    def __tensor_flatten__(self):
        return ["_data", "_scale"], [self._name]

    @classmethod
    def __tensor_unflatten__(cls, inner, attributes, outer_size=None, outer_stride=None):
        return cls(inner["_data"], inner["_scale"], *attributes)

    def __repr__(self) -> str:
        return f"TernaryGatherWeight({self._name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrapper = next(a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, cls))
        out = func(*pytree.tree_map_only(cls, lambda t: t._data, args), **pytree.tree_map_only(cls, lambda t: t._data, kwargs))
        if func is aten.copy_.default:
            return args[0]
        if func in _KEEP_WRAPPED:
            return pytree.tree_map_only(Tensor, lambda t: cls(t, wrapper._scale, wrapper._name, wrapper._fresh), out)
        return out

    def mark_scale_fresh(self) -> None:
        """Called by ``precompute_tensor_scales`` once ``_scale`` holds the absmean of the current weights."""
        self._fresh["version"] = self._data._version

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy) -> tuple[tuple[Tensor, ...], Any]:
        if self._fresh["version"] != self._data._version:
            raise StaleTensorScalesError(
                f"2-bit all-gather of {self._name!r}: its weight changed since precompute_tensor_scales(model) ran "
                "(or it never ran); call it once before the first forward and after every optimizer.step()"
            )
        scale = self._scale.detach().float().clamp_min(EPS)
        codes = torch.clamp(torch.round(self._data.detach().float() / scale), -1, 1).to(torch.int8)
        rows, world = outer_size[0], mesh.size()
        if rows % world == 0:
            return (pack_ternary(codes),), (scale.clone(), self.shape[1], rows)
        # FSDP2 pads an uneven shard and then wants the all-gather input in the padded shard's
        # shape: the codes go as one int8 per weight (4x fewer bytes than fp32, not 16x)
        if self._name not in _WARNED_UNEVEN:
            _WARNED_UNEVEN.add(self._name)
            warnings.warn(
                f"2-bit all-gather: {self._name!r} has {rows} rows, not a multiple of the {world} FSDP ranks; FSDP2 "
                "needs this layer's all-gather input in its padded shard shape, so it gathers int8 codes "
                "(1 byte per weight) instead of 2-bit ones",
                BitcompileWarning,
                stacklevel=2,
            )
        padded = codes.new_zeros((-(-rows // world), codes.shape[1]))
        padded[: codes.shape[0]] = codes
        return (padded,), (scale.clone(), self.shape[1], rows)

    def fsdp_post_all_gather(
        self, all_gather_outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype, *, out: Tensor | None = None
    ):
        (gathered,) = all_gather_outputs
        scale, in_features, rows = metadata
        codes = unpack_ternary(gathered, in_features) if gathered.dtype == torch.uint8 else gathered
        weight = codes[:rows].to(param_dtype) * scale.to(param_dtype)
        if out is not None:  # later all-gathers: refill the unsharded parameter FSDP2 keeps (its storage was freed)
            with torch.no_grad():
                out.copy_(weight)
            return None
        return weight, (weight,)


def enable_two_bit_all_gather(model: nn.Module) -> list[str]:
    """Make FSDP2 all-gather the precomputed-scale layers of ``model`` as 2-bit codes; returns their names.

    Call it after ``enable_tensor_scales(model, options, auto=False)`` and **before**
    ``fully_shard``; then call ``precompute_tensor_scales(model)`` once before the first
    forward and after every ``optimizer.step()`` (FSDP2 gathers the root's layers before any
    forward pre-hook of the model could refresh the scales, so ``auto=True`` is refused).
    The parameter keeps its name, shape, dtype and fp32 values: ``state_dict`` and DCP
    checkpoints are unchanged.
    """
    state = getattr(model, "_bitcpm_tensor_scales", None)
    if state is None:
        raise RuntimeError(
            "enable_two_bit_all_gather needs precomputed per-tensor scales: call "
            "bitcompile.distributed.enable_tensor_scales(model, {'group_size': 'tensor', ...}, auto=False) first"
        )
    if state.auto:
        raise ValueError(
            "enable_two_bit_all_gather needs enable_tensor_scales(..., auto=False): FSDP2 gathers the root's "
            "layers before the model's forward pre-hook runs, so call precompute_tensor_scales(model) yourself "
            "after every optimizer.step() (and once before the first forward)"
        )
    names = []
    for name in state.names:
        module = model.get_submodule(name)
        if not isinstance(module, TensorScaledLinear) or type(module.weight).__name__ == "DTensor":
            raise RuntimeError(f"enable_two_bit_all_gather: {name!r} is already sharded; call it before fully_shard")
        weight = module.weight
        module.weight = nn.Parameter(TernaryGatherWeight(weight.data, module.weight_scale, name), requires_grad=weight.requires_grad)
        names.append(name)
    state.two_bit = True
    return names
