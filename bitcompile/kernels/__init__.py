"""Kernels behind the ``bitcpm`` ops. ``reference`` is the oracle every other kernel is tested against."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch

KERNEL_NAMES = ("reference", "cpu", "cann")


def get_kernel(name: str) -> ModuleType:
    """The kernel module registered under ``name`` (see :data:`KERNEL_NAMES`)."""
    if name == "reference":
        from bitcompile.kernels import reference

        return reference
    if name == "cpu":
        # The C kernels when built; each of its functions falls back to the reference otherwise.
        from bitcompile.kernels import cpu

        return cpu
    if name == "cann":
        # torch_npu, or its CPU emulator when torch_npu is absent; imported only when asked for.
        from bitcompile.kernels import cann

        return cann
    raise ValueError(f"unknown bitcpm kernel {name!r}; available: {', '.join(KERNEL_NAMES)}")


def _on_npu(example_inputs: Iterable[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "npu" for t in example_inputs)


def resolve_target(target: str, example_inputs: Iterable[Any] = ()) -> str:
    """Map a config ``target`` to the kernel name the ops run on (``"auto"`` picks cann for npu inputs)."""
    if target == "cann" or (target == "auto" and _on_npu(example_inputs)):
        return "cann"
    if target == "reference":
        return "reference"
    if target in ("auto", "cpu"):
        # The C kernels (kernels/cpu.py) when the build produced them; else the reference, said once.
        from bitcompile.kernels import cpu

        if cpu.available():
            return "cpu"
        cpu._lib()  # logs the one-time warning naming the reason
        return "reference"
    raise ValueError(f"unknown bitcpm target {target!r}")
