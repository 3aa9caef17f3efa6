"""What ``.to(dtype)``, ``.half()`` and ``.bfloat16()`` mean for a packed module.

The codes (2-bit ternary or int8) and the fp32 scales *are* the packed format: rounding the
scales to bf16 drifted a packed model's outputs by ~1 % and made ``save_packed`` write a
checkpoint that ``load_packed`` refuses. So a floating-point conversion of a packed module
changes only its ``bias`` and its ``original_dtype`` (the dtype of the float layer it stands
in for: ``save_packed`` records it, a checkpoint's bias is stored in it, and an int8
embedding returns it); codes and scales keep their dtype. A device move (``.to("cuda")``)
moves every tensor. The output of a packed layer follows its input's dtype, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class FixedFormatModule(nn.Module):
    """Base of the packed modules: ``_apply`` (``.to``, ``.half``, ...) never changes the dtype of
    the buffers named in ``format_buffers``, and ``original_dtype`` follows the bias."""

    format_buffers: tuple[str, ...] = ()
    original_dtype: torch.dtype

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FixedFormatModule:
        kept = {name: self._buffers[name] for name in self.format_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                # the unconverted tensor, on the new device (the same object when the device is
                # unchanged, so codes and scales a tied head shares with its embedding stay shared)
                self._buffers[name] = before.to(device=after.device)
        bias = self._buffers.get("bias")
        if bias is not None:
            converted = bias.dtype
        else:  # what the conversion would make of a tensor of the original dtype
            converted = fn(torch.empty(0, dtype=self.original_dtype)).dtype
        if converted.is_floating_point:
            self.original_dtype = converted
        return self
