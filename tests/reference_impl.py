"""An independent reference of DESIGN.md §3, written for the tests from the formulas.

Deliberately shares no code with the package: loops over groups explicitly, accumulates
integer dot products in int64, and expresses the straight-through estimator the way the
papers do (``w + (q(w) - w).detach()``), so that a bug in bitcompile cannot hide behind
the same bug here.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def group_bounds(k: int, group_size) -> list[tuple[int, int]]:
    """Column ranges of the scale groups of one row (``group_size``: -1, "tensor" or g > 0)."""
    if group_size in (-1, "tensor"):
        return [(0, k)]
    return [(start, min(start + group_size, k)) for start in range(0, k, group_size)]


def weight_scales(w: torch.Tensor, group_size) -> torch.Tensor:
    """fp32 ``(N, n_groups)`` absmean scales."""
    w = w.detach().float()
    if group_size == "tensor":
        return torch.full((w.shape[0], 1), max(w.abs().mean().item(), EPS))
    cols = [w[:, a:b].abs().mean(dim=1).clamp_min(EPS) for a, b in group_bounds(w.shape[1], group_size)]
    return torch.stack(cols, dim=1)


def ternary_codes(w: torch.Tensor, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    s = weight_scales(w, group_size)
    q = torch.empty(w.shape, dtype=torch.int64)
    for g, (a, b) in enumerate(group_bounds(w.shape[1], group_size)):
        q[:, a:b] = torch.clamp(torch.round(w.detach().float()[:, a:b] / s[:, g : g + 1]), -1, 1)
    return q, s


def fake_quant_weight(w: torch.Tensor, group_size) -> torch.Tensor:
    """``q_w * s_w`` in fp32 (N, K)."""
    q, s = ternary_codes(w, group_size)
    out = torch.empty(w.shape, dtype=torch.float32)
    for g, (a, b) in enumerate(group_bounds(w.shape[1], group_size)):
        out[:, a:b] = q[:, a:b].float() * s[:, g : g + 1]
    return out


def activation_codes(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x2d.detach().float()
    s = x.abs().amax(dim=1).clamp_min(EPS) / 127
    return torch.clamp(torch.round(x / s[:, None]), -128, 127).to(torch.int64), s


def ternary_linear_forward(x, w, b, group_size, activations) -> torch.Tensor:
    """Forward values in fp64 (exact integer accumulation, then scaling), shape ``(..., N)``."""
    x2d = x.reshape(-1, x.shape[-1])
    q_w, s_w = ternary_codes(w, group_size)
    y = torch.zeros(x2d.shape[0], w.shape[0], dtype=torch.float64)
    if activations == "int8":
        q_x, s_x = activation_codes(x2d)
        for g, (a, b_) in enumerate(group_bounds(w.shape[1], group_size)):
            acc = q_x[:, a:b_] @ q_w[:, a:b_].t()  # int64: exact
            y += acc.double() * s_w[:, g].double()
        y *= s_x.double()[:, None]
    else:
        y = x2d.double() @ fake_quant_weight(w, group_size).double().t()
    if b is not None:
        y += b.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def fake_quant_linear(x, w, b, group_size, activations) -> torch.Tensor:
    """Eager straight-through fake-quant linear in fp32: the training reference."""
    wq = w + (fake_quant_weight(w, group_size).to(w.dtype) - w).detach()
    if activations == "int8":
        x2d = x.reshape(-1, x.shape[-1])
        q, s = activation_codes(x2d)
        xq = (q.float() * s[:, None]).to(x.dtype).reshape(x.shape)
        x = x + (xq - x).detach()
    return torch.nn.functional.linear(x.float(), wq.float(), None if b is None else b.float()).to(x.dtype)


class FakeQuantLinear(torch.nn.Module):
    """Drop-in for nn.Linear computing the eager fake-quant STE reference (shares the Linear's parameters)."""

    def __init__(self, linear: torch.nn.Linear, group_size=-1, activations="int8"):
        super().__init__()
        self.linear, self.group_size, self.activations = linear, group_size, activations

    @property
    def weight(self) -> torch.Tensor:  # model code reads it (T5: self.wo.weight.dtype)
        return self.linear.weight

    def forward(self, x):
        return fake_quant_linear(x, self.linear.weight, self.linear.bias, self.group_size, self.activations)


def swap_linears_for_fake_quant(model: torch.nn.Module, skip=("lm_head",), **kw) -> torch.nn.Module:
    """Replace every nn.Linear (except names in ``skip``) by :class:`FakeQuantLinear`, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear) and name not in skip:
            setattr(model, name, FakeQuantLinear(child, **kw))
        else:
            swap_linears_for_fake_quant(child, skip, **kw)
    return model
