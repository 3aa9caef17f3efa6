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
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Shape of the token-id batch used as the example input of a Hugging Face folder.
HF_EXAMPLE_SHAPE = (1, 16)

_EXPECTED = "MODEL must be 'module:function' returning (model, example_inputs), or a local Hugging Face folder"


class ModelLoadError(ValueError):
    """The MODEL argument could not be turned into ``(model, example_inputs)``."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


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
            raise ModelLoadError(f"MODEL {spec!r}: importing {module_part!r} failed: {_first_line(error)}") from error
        return module
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_part)
    except Exception as error:
        raise ModelLoadError(f"MODEL {spec!r}: cannot import module {module_part!r}: {_first_line(error)}") from error


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
        raise ModelLoadError(f"MODEL {spec!r}: calling {function_name}() failed: {_first_line(error)}") from error
    return _check_result(spec, result)


def _load_hf_folder(folder: Path) -> tuple[nn.Module, tuple[Any, ...]]:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"folder {str(folder)!r} has no config.json; expected a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickle weights are not loaded)" if pickled else ""
        raise ModelLoadError(f"folder {str(folder)!r} has no *.safetensors weights{hint}")
    try:
        import transformers
    except ImportError as error:
        raise ModelLoadError(
            f"loading the Hugging Face folder {str(folder)!r} needs transformers: pip install transformers"
        ) from error
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"folder {str(folder)!r}: config.json is not valid JSON: {_first_line(error)}") from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
    loaders = [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for auto in loaders:
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
            break
        except Exception as error:  # try the next auto class, report all if none fits
            errors.append(f"{auto.__name__}: {_first_line(error)}")
    else:
        raise ModelLoadError(f"folder {str(folder)!r} could not be loaded with transformers ({'; '.join(errors)})")
    vocab = int(config.get("vocab_size") or getattr(model.config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, HF_EXAMPLE_SHAPE, generator=generator)
    return model.eval(), (input_ids,)


def load_model(spec: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """Parse ``MODEL`` (see the module docstring) into ``(model, example_inputs)``.

    Raises:
        ModelLoadError: one line naming what was wrong and what was expected.
    """
    path = Path(spec)
    if path.is_dir():
        return _load_hf_folder(path)
    if ":" in spec:
        return _load_function(spec)
    if path.exists():
        raise ModelLoadError(f"{_EXPECTED}; {spec!r} is a file, not a folder (did you mean '{spec}:function'?)")
    raise ModelLoadError(f"{_EXPECTED}; {spec!r} is neither 'module:function' nor an existing folder")
