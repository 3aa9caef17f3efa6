"""Recognise weights that are already ternary (pseudo-quantized checkpoints).

BitCPM4-CANN / BitCPM-CANN and BitNet "bf16" releases store float weights in which every
scale group already equals ``{-s, 0, +s}``. Running the absmean quantizer on them would
rescale them (absmean is ``s`` times the fraction of non-zeros), so such weights are
packed with their own ``s`` instead: lossless up to one bf16 rounding of ``s``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitcompile.kernels.groups import EPS, PER_TENSOR, expand_scales

#: Non-zero magnitudes within a group may differ by this much (relative) and still count as
#: one value: one bf16 ulp, since bf16 checkpoints round ``s`` per element.
BF16_ULP = 2.0**-7


def _group_views(magnitude: Tensor, group_code: int) -> list[tuple[int, int]]:
    k = magnitude.shape[1]
    if group_code <= 0:
        return [(0, k)]
    return [(start, min(start + group_code, k)) for start in range(0, k, group_code)]


def detect_ternary(weight: Tensor, group_code: int) -> tuple[Tensor, Tensor] | None:
    """``(codes int8 (N,K), scales fp32 (N, n_groups))`` if ``weight`` is already ternary, else None.

    A group is ternary when all its non-zero magnitudes agree within :data:`BF16_ULP`;
    its scale is their mean. All-zero groups get the scale ``EPS`` (their codes are 0).
    """
    w = weight.detach().float()
    if w.dim() != 2 or not torch.isfinite(w).all():
        return None
    magnitude = w.abs()
    nonzero = magnitude > 0
    if group_code == PER_TENSOR:
        values = magnitude[nonzero]
        if values.numel() and (values.max() - values.min()) > BF16_ULP * values.max():
            return None
        scale = values.mean() if values.numel() else torch.tensor(EPS)
        scales = scale.clamp_min(EPS).expand(w.shape[0], 1).contiguous()
    else:
        columns = []
        for start, end in _group_views(magnitude, group_code):
            group, mask = magnitude[:, start:end], nonzero[:, start:end]
            count = mask.sum(dim=1)
            high = torch.where(mask, group, torch.zeros_like(group)).amax(dim=1)
            low = torch.where(mask, group, torch.full_like(group, float("inf"))).amin(dim=1)
            spread_ok = (count == 0) | ((high - low) <= BF16_ULP * high)
            if not bool(spread_ok.all()):
                return None
            mean = (group * mask).sum(dim=1) / count.clamp_min(1)
            columns.append(torch.where(count > 0, mean, torch.full_like(mean, EPS)).clamp_min(EPS))
        scales = torch.stack(columns, dim=1)
    codes = torch.sign(w).to(torch.int8)
    restored = codes.float() * expand_scales(scales, w.shape[1], group_code)
    if not torch.allclose(restored, w, rtol=BF16_ULP, atol=0):
        return None
    return codes, scales
