"""Kernels behind the ``bitcpm`` ops. ``reference`` is the oracle every other kernel is tested against."""

from __future__ import annotations

from types import ModuleType

KERNEL_NAMES = ("reference",)


def get_kernel(name: str) -> ModuleType:
    """The kernel module registered under ``name`` (see :data:`KERNEL_NAMES`)."""
    if name == "reference":
        from bitcompile.kernels import reference

        return reference
    raise ValueError(f"unknown bitcpm kernel {name!r}; available: {', '.join(KERNEL_NAMES)}")


def resolve_target(target: str) -> str:
    """Map a config ``target`` to the kernel name the ops run on CPU tensors."""
    if target in ("auto", "reference", "cpu"):
        # The fast C kernels are not built yet; "cpu" and "auto" run the reference kernels.
        return "reference"
    if target == "cann":
        raise NotImplementedError(
            "target='cann' (Ascend lowering through torch_npu) is not implemented in this version of bitcompile; "
            "use target='auto', 'cpu' or 'reference'"
        )
    raise ValueError(f"unknown bitcpm target {target!r}")
