"""bitcompile: a torch.compile backend that turns PyTorch models into ternary (1.58-bit) models.

Quantization-aware training is one line::

    model = torch.compile(model, backend="bitcpm", options={"group_size": 128})

and :func:`explain` shows what the compiler did to each layer.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from bitcompile.config import BitcompileWarning, TernaryConfig, TernaryConfigError
from bitcompile.inspect.report import ExplainReport, explain
from bitcompile.runtime.checkpoint import CheckpointError, load_packed, save_packed
from bitcompile.runtime.modules import PackedTernaryLinear, pack, plan_packing

try:
    __version__ = version("bitcompile")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BitcompileWarning",
    "CheckpointError",
    "ExplainReport",
    "PackedTernaryLinear",
    "TernaryConfig",
    "TernaryConfigError",
    "__version__",
    "compile",
    "explain",
    "export_onnx",
    "load_packed",
    "pack",
    "plan_packing",
    "save_packed",
]


def compile(model: torch.nn.Module, config: TernaryConfig | None = None, **torch_compile_kwargs: Any):
    """``torch.compile(model, backend="bitcpm")`` with a :class:`TernaryConfig` built in Python.

    Extra keyword arguments (``dynamic=True``, ``fullgraph=True`` ...) go to ``torch.compile``.
    """
    from bitcompile.backend import backend_for

    return torch.compile(model, backend=backend_for(config or TernaryConfig()), **torch_compile_kwargs)


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: Any, **kwargs: Any):
    """Export a packed (or packable) ternary model to ONNX; see :func:`bitcompile.export.onnx.export_onnx`.

    Imported on first use, so ``import bitcompile`` does not need onnx installed.
    """
    from bitcompile.export.onnx import export_onnx as _export_onnx

    return _export_onnx(model, example_inputs, path, **kwargs)
