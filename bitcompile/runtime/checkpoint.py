"""Save and load packed models: safetensors (never pickle) plus a metadata header.

The header records the format version, the packed layout (name and version), the scale
convention and, per packed layer, its shape, group size, activation mode and original
dtype. Loading checks all of it, and every tensor's shape, dtype and code values, and
names the offending tensor on any mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from bitcompile.kernels.packing import LAYOUT_NAME, LAYOUT_VERSION
from bitcompile.runtime.modules import PackedTernaryLinear, linear_view, replace_submodule

FORMAT = "bitcompile-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A packed checkpoint does not match what it claims to be or the model it is loaded into."""


def _layer_metadata(layer: PackedTernaryLinear) -> dict:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "group_size": layer.group_size,
        "activations": layer.activations,
        "original_dtype": str(layer.original_dtype).removeprefix("torch."),
    }


def save_packed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory/model.safetensors`` with every tensor of a packed model and its metadata."""
    layers = {name: _layer_metadata(m) for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    if not layers:
        raise CheckpointError("save_packed: the model has no PackedTernaryLinear layers; call bitcompile.pack(model) first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout": LAYOUT_NAME,
        "layout_version": str(LAYOUT_VERSION),
        "scale_convention": "multiplier",
        "layers": json.dumps(layers),
    }
    path = out / WEIGHTS_FILE
    save_model(model, str(path), metadata=metadata)  # drops duplicate names of tied tensors
    return path


def _read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    expected = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layout": LAYOUT_NAME,
                "layout_version": str(LAYOUT_VERSION), "scale_convention": "multiplier"}  # fmt: skip
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise CheckpointError(
                f"{path}: metadata {key}={metadata.get(key)!r}, this version of bitcompile reads {key}={value!r}"
            )
    try:
        metadata["layers"] = json.loads(metadata["layers"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: metadata 'layers' is missing or not JSON ({error})") from None
    return metadata


def _packed_replacements(model: nn.Module, layers: dict) -> dict[str, PackedTernaryLinear]:
    """Empty packed layers of the recorded shapes for the listed ``nn.Linear`` layers (model not touched)."""
    replacements = {}
    for name, info in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in the model") from None
        view = module if isinstance(module, PackedTernaryLinear) else linear_view(module)
        if view is None:
            raise CheckpointError(f"layer {name!r}: expected nn.Linear in the model, found {type(module).__name__}")
        shape = (info["out_features"], info["in_features"])
        if (view.out_features, view.in_features) != shape:
            raise CheckpointError(
                f"layer {name!r}: checkpoint has (out, in) = {shape}, "
                f"the model has {(view.out_features, view.in_features)}"
            )
        replacements[name] = PackedTernaryLinear(
            info["in_features"], info["out_features"], bias=info["bias"], group_size=info["group_size"],
            activations=info["activations"], dtype=getattr(torch, info["original_dtype"]),
        )  # fmt: skip
    return replacements


def _expected_state(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state_dict the model will have once ``replacements`` are swapped in."""
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in replacements)}
    for name, layer in replacements.items():
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    return state


def _check_codes(name: str, packed: torch.Tensor) -> None:
    for shift in (0, 2, 4, 6):
        bad = ((packed >> shift) & 3) == 3
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CheckpointError(f"tensor {name!r} holds the 2-bit code 3 (row {row}), which is not a ternary value")


def load_packed(directory: str | Path, model_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Load a checkpoint written by :func:`save_packed` into a model of the same architecture.

    ``model_or_factory`` is the float model (or a function building it); its listed linear
    layers are replaced by packed ones and every tensor is loaded bit-exactly.
    """
    path = Path(directory) / WEIGHTS_FILE if Path(directory).is_dir() else Path(directory)
    if not path.exists():
        raise CheckpointError(f"no packed checkpoint at {path}")
    metadata = _read_metadata(path)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    # Everything is checked against the packed architecture before the user's model is touched.
    replacements = _packed_replacements(model, metadata["layers"])
    expected = _expected_state(model, replacements)
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"tensor {name!r} in {path.name} has no place in the model")
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {name!r}: checkpoint has {tensor.dtype} {tuple(tensor.shape)}, "
                f"the model expects {want.dtype} {tuple(want.shape)}"
            )
        if name.endswith(".packed"):
            _check_codes(name, tensor)
        if name.endswith(".scales") and not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
            raise CheckpointError(f"tensor {name!r} has non-finite or non-positive scales")
    missing = set(expected) - set(tensors)
    aliases = _tied_aliases(model)
    unexplained = sorted(k for k in missing if not (aliases.get(k, set()) & set(tensors)))
    if unexplained:
        raise CheckpointError(f"{path.name} lacks tensor(s) the model needs: {', '.join(unexplained[:5])}")
    for name, layer in replacements.items():
        replace_submodule(model, name, layer)
    model.load_state_dict(tensors, strict=False)
    return model


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """state_dict key → the other keys that name the same tensor."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {name: names - {name} for names in by_tensor.values() for name in names}
