"""Load a local Hugging Face model folder (``config.json`` + ``*.safetensors``) from disk only.

Used by ``pack(folder)`` and by the command line's ``MODEL`` argument
(:mod:`bitcompile.model_loader`). ``transformers`` is imported only when a folder is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HF_EXAMPLE_SHAPE", "ModelLoadError", "first_line", "load_hf_folder"]

#: Shape of the token-id batch used as the example input of a Hugging Face folder.
HF_EXAMPLE_SHAPE = (1, 16)


class ModelLoadError(ValueError):
    """A model could not be loaded (a ``MODEL`` argument of the command line, or a Hugging Face folder)."""


def first_line(error: BaseException) -> str:
    """``"TypeName: first line of the message"``: an exception in one line, for a one-line error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_hf_folder(folder: Path) -> tuple[nn.Module, tuple[Any, ...]]:
    """A local Hugging Face model folder as ``(model in eval mode, (random token ids,))``; never downloads.

    Raises:
        ModelLoadError: one line naming what is missing or what failed.
    """
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
        raise ModelLoadError(f"folder {str(folder)!r}: config.json is not valid JSON: {first_line(error)}") from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
    loaders = [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for auto in loaders:
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
            break
        except Exception as error:  # try the next auto class, report all if none fits
            errors.append(f"{auto.__name__}: {first_line(error)}")
    else:
        raise ModelLoadError(f"folder {str(folder)!r} could not be loaded with transformers ({'; '.join(errors)})")
    vocab = int(config.get("vocab_size") or getattr(model.config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, HF_EXAMPLE_SHAPE, generator=generator)
    return model.eval(), (input_ids,)
