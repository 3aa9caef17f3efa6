"""Turn the ``MODEL`` argument of the command line into ``(model, example_inputs)``.

``MODEL`` is one of:

* ``package.module:function`` (or ``path/to/file.py:function``): a function taking no
  arguments that returns ``(model, example_inputs)``, where ``model`` is an ``nn.Module``
  and ``example_inputs`` a tuple of positional inputs (a single tensor is accepted too);
* a local Hugging Face model folder (``config.json`` + ``*.safetensors``), loaded with
  ``transformers`` from disk only (never downloaded), with a batch of random token ids.

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

from bitcompile.runtime.hf_folder import HF_EXAMPLE_SHAPE, ModelLoadError, first_line, load_hf_folder

__all__ = ["HF_EXAMPLE_SHAPE", "ModelLoadError", "load_model"]

_EXPECTED = "MODEL must be 'module:function' returning (model, example_inputs), or a local Hugging Face folder"


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


def load_model(spec: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """Parse ``MODEL`` (see the module docstring) into ``(model, example_inputs)``.

    Raises:
        ModelLoadError: one line naming what was wrong and what was expected.
    """
    path = Path(spec)
    if path.is_dir():
        return load_hf_folder(path)
    if ":" in spec:
        return _load_function(spec)
    if path.exists():
        raise ModelLoadError(f"{_EXPECTED}; {spec!r} is a file, not a folder (did you mean '{spec}:function'?)")
    raise ModelLoadError(f"{_EXPECTED}; {spec!r} is neither 'module:function' nor an existing folder")
