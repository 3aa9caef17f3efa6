"""The opt-in int8 output head of a packed model: ``pack(model, head="int8")``.

Why: once every decoder linear is 2-bit, the output head (tied to the token embedding in
most small LMs) is the largest weight left and the largest cost of a decode step: SmolLM-135M's
fp32 head is 113 MB, four times all its ternary layers together. Stored as per-row absmax int8
codes and run as W8A8 (the per-token int8 activation quantizer of the ternary layers, exact
int32 sums with VNNI), it reads a quarter of the bytes; a tied embedding reads its rows from
the same codes, so the fp32 table disappears too. This is the ``Q8_0``-style output layer
llama.cpp serves by default; the extra error is measured in docs/kernels.md and bounded in
tests/test_int8_head.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitcompile.kernels import reference
from bitcompile.ops.dense import int8_dense_linear_op, int8_linear
from bitcompile.runtime.conversion import FixedFormatModule

__all__ = ["Int8Embedding", "Int8Linear", "int8_dense_linear_op"]  # the op: for BC, it lives in bitcompile.ops.dense


class Int8Linear(FixedFormatModule):
    """A linear layer with per-row int8 weights, run as W8A8: ``codes`` int8 ``(out, in)``,
    ``scales`` fp32 ``(out, 1)``, ``bias`` (original dtype, optional). Inference only.

    A tied head shares ``codes`` and ``scales`` with an :class:`Int8Embedding` (the same tensors).
    ``.to(dtype)`` converts the bias only (:mod:`bitcompile.runtime.conversion`).
    """

    format_buffers = ("codes", "scales")

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.original_dtype = in_features, out_features, dtype
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, 1))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None) -> Int8Linear:
        """Quantize an ``(out, in)`` float weight (per-row absmax, :func:`reference.quantize_rows_int8`)."""
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        layer.codes, layer.scales = reference.quantize_rows_int8(weight)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def share_codes_with(self, embedding: Int8Embedding) -> None:
        """Tie this head to ``embedding``: both read the same int8 codes and scales."""
        self.codes, self.scales = embedding.codes, embedding.scales

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input's last dim {x.shape[-1]} != in_features {self.in_features}")
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if torch.compiler.is_compiling() or needs_grad:  # the op carries the autograd formula
            y = int8_dense_linear_op(x, self.codes, self.scales, self.bias)
        elif torch.autograd._profiler_enabled():  # visible to torch.profiler as one op
            with torch.profiler.record_function("bitcpm::int8_dense_linear"):
                y = self._eager(x)
        else:
            y = self._eager(x)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _eager(self, x: Tensor) -> Tensor:
        # NOTE: the kernel directly, not the op: the dispatcher costs more than a decode GEMV
        return int8_linear(x, self.codes, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 weights and activations"


class Int8Embedding(FixedFormatModule):
    """``nn.Embedding`` whose table is per-row int8: row ``i`` is ``codes[i] * scales[i]``, returned
    in ``original_dtype``. ``.to(dtype)`` changes that output dtype, never the int8 table
    (:mod:`bitcompile.runtime.conversion`)."""

    format_buffers = ("codes", "scales")

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.original_dtype = dtype
        self.register_buffer("codes", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, 1))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError("Int8Embedding: max_norm, scale_grad_by_freq and sparse embeddings are not supported")
        weight = embedding.weight
        layer = cls(weight.shape[0], weight.shape[1], padding_idx=embedding.padding_idx, dtype=weight.dtype)
        layer.codes, layer.scales = reference.quantize_rows_int8(weight)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.codes).to(torch.float32) * F.embedding(ids, self.scales)
        return rows.to(self.original_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
