"""bitcompile: a torch.compile backend that turns PyTorch models into ternary (1.58-bit) models.

Quantization-aware training is one line::

    model = torch.compile(model, backend="bitcpm", options={"group_size": 128})

and :func:`explain` shows what the compiler did to each layer.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import torch

from bitcompile.config import BitcompileWarning, TernaryConfig, TernaryConfigError, as_config
from bitcompile.kernels.groups import ScaleGroups
from bitcompile.runtime.checkpoint import CheckpointError, load_packed, save_packed
from bitcompile.runtime.layers import PackedTernaryLinear
from bitcompile.runtime.pack import pack, plan_packing

if TYPE_CHECKING:
    from bitcompile.inspect.report import ExplainReport, explain
    from bitcompile.runtime.compiled_decode import compile_decoder

try:
    __version__ = version("bitcompile")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BitcompileWarning",
    "CheckpointError",
    "ExplainReport",
    "PackedTernaryLinear",
    "ScaleGroups",
    "TernaryConfig",
    "TernaryConfigError",
    "__version__",
    "compile",
    "compile_decoder",
    "explain",
    "export_genai",
    "export_gguf",
    "export_hf_bitnet",
    "export_onnx",
    "load_packed",
    "pack",
    "plan_packing",
    "save_packed",
]


def compile(model: torch.nn.Module, config: TernaryConfig | dict[str, Any] | None = None, **torch_compile_kwargs: Any):
    """``torch.compile(model, backend="bitcpm")`` with a :class:`TernaryConfig` (or options dict) built in Python.

    Unlike ``torch.compile(..., options=...)``, a bad option raises :class:`TernaryConfigError`
    here, not at the first call. Extra keyword arguments (``dynamic=True``, ``fullgraph=True``
    ...) go to ``torch.compile``.

    A ``DistributedDataParallel`` around a ``torch.nn`` container (``DDP(nn.Sequential(...))``)
    is handled specially: Dynamo skips the container's frame under DDP, so
    ``torch.compile(ddp_model, backend="bitcpm")`` never hands a graph to the backend and every
    layer trains in float. Here the wrapped container's ``forward`` is compiled instead and the
    DDP model itself is returned (state_dict keys unchanged).
    """
    from bitcompile.backend import backend_for

    backend = backend_for(as_config(config, "bitcompile.compile"))
    wrapped = _ddp_wrapped_torch_nn_module(model)
    if wrapped is not None:
        wrapped.forward = torch.compile(wrapped.forward, backend=backend, **torch_compile_kwargs)
        return model
    return torch.compile(model, backend=backend, **torch_compile_kwargs)


def _ddp_wrapped_torch_nn_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module inside ``DDP(module)`` when its class comes from ``torch.nn`` (a frame Dynamo skips)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and type(model.module).__module__.startswith("torch.nn."):
        return model.module
    return None


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: Any, **kwargs: Any):
    """Export a packed (or packable) ternary model to ONNX; see :func:`bitcompile.export.onnx.export_onnx`.

    Imported on first use, so ``import bitcompile`` does not need onnx installed.
    """
    from bitcompile.export.onnx import export_onnx as _export_onnx

    return _export_onnx(model, example_inputs, path, **kwargs)


def export_genai(model: torch.nn.Module, folder: Any, **kwargs: Any):
    """Write a folder onnxruntime-genai runs (KV-cache ONNX, genai_config.json, tokenizer); see
    :func:`bitcompile.export.genai.export_genai`. Imported on first use."""
    from bitcompile.export.genai import export_genai as _export_genai

    return _export_genai(model, folder, **kwargs)
def export_gguf(model: torch.nn.Module, path: Any, **kwargs: Any):
    """Write a packed ternary Llama as GGUF for llama.cpp; see :func:`bitcompile.export.gguf.export_gguf`."""
    from bitcompile.export.gguf import export_gguf as _export_gguf

    return _export_gguf(model, path, **kwargs)


def export_hf_bitnet(model: torch.nn.Module, folder: Any, **kwargs: Any):
    """Write a packed model as a Hugging Face BitNet checkpoint; see :func:`bitcompile.export.hf_bitnet.export_hf_bitnet`."""
    from bitcompile.export.hf_bitnet import export_hf_bitnet as _export_hf_bitnet

    return _export_hf_bitnet(model, folder, **kwargs)


#: Public names whose modules load Dynamo and rich: imported on first use, so that
#: ``import bitcompile`` stays light (tests/test_layering.py checks it).
_LAZY = {
    "ExplainReport": "bitcompile.inspect.report",
    "explain": "bitcompile.inspect.report",
    "compile_decoder": "bitcompile.runtime.compiled_decode",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bitcompile' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
