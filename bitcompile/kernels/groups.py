"""Scale-group geometry shared by every kernel.

The ops take the group mode as one int: ``PER_ROW`` (-1) one scale per output row,
``PER_TENSOR`` (0) one scale for the matrix, ``g > 0`` groups of ``g`` along K. A K that
``g`` does not divide ends with a shorter group; nothing is padded with weights.
Scales are always stored as a ``(N, n_groups)`` fp32 tensor of multipliers.
"""

from __future__ import annotations

import torch

PER_ROW = -1
PER_TENSOR = 0

#: Lower bound of every scale (DESIGN.md §3): a zero row or token must not divide by zero.
EPS = 1e-5

#: The C kernels take the group length as a C ``int``; a longer one would wrap around silently.
#: (A group longer than a layer's K is one group of K: the last group is always cut at K.)
MAX_GROUP_SIZE = 2**31 - 1


def describe(group_code: int) -> str:
    """Human form of a group code, as the config spells it."""
    if group_code == PER_ROW:
        return "per-row"
    if group_code == PER_TENSOR:
        return "per-tensor"
    return f"groups of {group_code}"


def check_group_code(group_code: int) -> None:
    if group_code < PER_ROW or group_code > MAX_GROUP_SIZE:
        raise ValueError(f"group_size code {group_code} is invalid: expected -1, 0 or a positive int below 2**31")


def num_groups(in_features: int, group_code: int) -> int:
    """Number of scale columns for a weight with ``in_features`` columns."""
    check_group_code(group_code)
    if group_code <= 0:
        return 1
    return -(-in_features // group_code)


def expand_scales(scales: torch.Tensor, in_features: int, group_code: int) -> torch.Tensor:
    """``(N, n_groups)`` scales → ``(N, K)``, one multiplier per weight element.

    Allocates ``N × K`` values whatever ``group_code`` is: a group longer than K is one group of
    K (repeating each scale ``group_code`` times first would allocate ``N × g``, 256 GB for
    ``g = 10**9``).
    """
    if group_code <= 0 or group_code >= in_features:
        return scales[:, :1].expand(scales.shape[0], in_features)
    return scales.repeat_interleave(group_code, dim=1)[:, :in_features]
