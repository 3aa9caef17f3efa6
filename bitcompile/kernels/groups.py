"""Scale groups: the typed value the options, passes and report use, and the geometry every kernel shares.

:class:`ScaleGroups` is how weight scales are grouped: per output row, per tensor, or groups of
``g`` along K. It travels as that type from ``TernaryConfig.group_size`` through the passes to
the report. The ``torch.library`` op schemas and the C kernels cannot take a Python type, so
they take its :attr:`ScaleGroups.code`, one int: ``PER_ROW`` (-1), ``PER_TENSOR`` (0) or
``g > 0``; the emitters and the packed layers convert at that boundary.

A K that ``g`` does not divide ends with a shorter group; nothing is padded with weights.
Scales are always stored as a ``(N, n_groups)`` fp32 tensor of multipliers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

PER_ROW = -1
PER_TENSOR = 0

#: Lower bound of every scale (DESIGN.md §3): a zero row or token must not divide by zero.
EPS = 1e-5

#: The C kernels take the group length as a C ``int``; a longer one would wrap around silently.
#: (A group longer than a layer's K is one group of K: the last group is always cut at K.)
MAX_GROUP_SIZE = 2**31 - 1


#: What ``group_size`` accepts, for error messages.
ACCEPTED_GROUP_SIZES = "-1 (per output row), 'tensor', or a positive int such as 32, 64, 128 (below 2**31)"


@dataclasses.dataclass(frozen=True)
class ScaleGroups:
    """How a ternary weight's scales are grouped: ``kind`` ``"row"``, ``"tensor"`` or ``"group"`` (of ``size``).

    Build one with :meth:`per_row`, :meth:`per_tensor`, :meth:`of` or, from a user's option
    value, :meth:`parse`. ``size`` is 0 unless ``kind == "group"``.
    """

    kind: Literal["row", "tensor", "group"]
    size: int = 0

    def __post_init__(self) -> None:
        sized = type(self.size) is int and (0 < self.size <= MAX_GROUP_SIZE if self.kind == "group" else self.size == 0)
        if self.kind not in ("row", "tensor", "group") or not sized:
            raise ValueError(f"ScaleGroups({self.kind!r}, {self.size!r}) is invalid: {ACCEPTED_GROUP_SIZES}")

    @classmethod
    def per_row(cls) -> ScaleGroups:
        """One scale per output row."""
        return cls("row")

    @classmethod
    def per_tensor(cls) -> ScaleGroups:
        """One scale for the whole weight matrix."""
        return cls("tensor")

    @classmethod
    def of(cls, size: int) -> ScaleGroups:
        """Groups of ``size`` along K (a positive int below 2**31)."""
        return cls("group", size)

    @classmethod
    def parse(cls, value: Any) -> ScaleGroups:
        """A user's ``group_size`` option: -1, ``"tensor"``, a positive int, or a ScaleGroups.

        Raises ``ValueError`` for anything else (0, ``"row"``, a bool, a float): the config turns
        it into a ``TernaryConfigError`` naming the option.
        """
        if isinstance(value, ScaleGroups):
            return value
        if isinstance(value, str) and value == "tensor":
            return cls.per_tensor()
        if isinstance(value, int) and not isinstance(value, bool) and (value == PER_ROW or 0 < value <= MAX_GROUP_SIZE):
            return cls.from_code(value)
        raise ValueError(f"group_size {value!r} is invalid: expected {ACCEPTED_GROUP_SIZES}")

    @classmethod
    def from_code(cls, group_code: int) -> ScaleGroups:
        """The value behind an op's / kernel's / checkpoint's int code (-1, 0 or g > 0)."""
        check_group_code(group_code)
        if group_code == PER_ROW:
            return cls.per_row()
        return cls.per_tensor() if group_code == PER_TENSOR else cls.of(group_code)

    @property
    def code(self) -> int:
        """The int the op schemas and kernels take: -1 per row, 0 per tensor, g > 0 groups of g."""
        return {"row": PER_ROW, "tensor": PER_TENSOR}.get(self.kind, self.size)

    @property
    def option(self) -> int | str:
        """The option's spelling (-1, ``"tensor"``, g): what ``to_options``, the report JSON and checkpoints write."""
        return "tensor" if self.kind == "tensor" else self.code

    @property
    def label(self) -> str:
        """For people: ``"per-row"``, ``"per-tensor"``, ``"groups of 128"``."""
        if self.kind == "group":
            return f"groups of {self.size}"
        return f"per-{self.kind}"


def check_group_code(group_code: int) -> None:
    """Raise ``ValueError`` unless ``group_code`` is an op's group code (-1, 0 or 0 < g < 2**31)."""
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
