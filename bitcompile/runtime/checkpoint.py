"""Save and load packed models: safetensors (never pickle) plus a metadata header.

The header records the format version, the packed layout (name and version), the scale
convention and, per packed layer, its shape, group size, activation mode and original
dtype. Loading checks all of it, and every tensor's shape, dtype and code values, and
names the offending tensor on any mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from bitcompile.kernels.packing import LAYOUT_NAME, LAYOUT_VERSION
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.modules import PackedTernaryLinear, linear_view, replace_submodule

FORMAT = "bitcompile-packed"
FORMAT_VERSION = 2  # 2 added "int8_layers" (the int8 head of pack(head="int8")); 1 is still read
READABLE_VERSIONS = ("1", "2")
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


def _int8_metadata(model: nn.Module) -> dict:
    """Per int8 module: its kind and shape, and for a head the embedding it shares codes with."""
    embeddings = {id(m.codes): name for name, m in model.named_modules() if isinstance(m, Int8Embedding)}
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Embedding):
            layers[name] = {"kind": "embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                            "padding_idx": m.padding_idx, "original_dtype": str(m.original_dtype).removeprefix("torch.")}  # fmt: skip
        elif isinstance(m, Int8Linear):
            layers[name] = {"kind": "linear", "in_features": m.in_features, "out_features": m.out_features,
                            "bias": m.bias is not None, "original_dtype": str(m.original_dtype).removeprefix("torch."),
                            "tied_to": embeddings.get(id(m.codes))}  # fmt: skip
    return layers


def save_packed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory/model.safetensors`` with every tensor of a packed model and its metadata."""
    layers = {name: _layer_metadata(m) for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    if not layers:
        raise CheckpointError("save_packed: the model has no PackedTernaryLinear layers; call bitcompile.pack(model) first")
    int8_layers = _int8_metadata(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        # version 1 when nothing needs 2, so older bitcompile still reads ternary-only checkpoints
        "format_version": str(FORMAT_VERSION if int8_layers else 1),
        "layout": LAYOUT_NAME,
        "layout_version": str(LAYOUT_VERSION),
        "scale_convention": "multiplier",
        "layers": json.dumps(layers),
        "int8_layers": json.dumps(int8_layers),
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
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: metadata format_version={metadata.get('format_version')!r}, this version of bitcompile "
            f"reads format_version in {READABLE_VERSIONS}"
        )
    expected = {"format": FORMAT, "layout": LAYOUT_NAME, "layout_version": str(LAYOUT_VERSION),
                "scale_convention": "multiplier"}  # fmt: skip
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise CheckpointError(
                f"{path}: metadata {key}={metadata.get(key)!r}, this version of bitcompile reads {key}={value!r}"
            )
    for key, default in (("layers", None), ("int8_layers", "{}")):
        try:
            metadata[key] = json.loads(metadata[key] if default is None else metadata.get(key, default))
        except (KeyError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: metadata {key!r} is missing or not JSON ({error})") from None
    return metadata


def _dtype(name: str, info: dict) -> torch.dtype:
    dtype = getattr(torch, str(info.get("original_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"layer {name!r}: metadata original_dtype={info.get('original_dtype')!r} is not a torch dtype")
    return dtype


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
            activations=info["activations"], dtype=_dtype(name, info),
        )  # fmt: skip
    return replacements


def _int8_replacements(model: nn.Module, layers: dict) -> dict[str, nn.Module]:
    """Empty int8 embeddings and heads of the recorded shapes (tied heads share their embedding's codes)."""
    replacements: dict[str, nn.Module] = {}
    for name, info in sorted(layers.items(), key=lambda item: item[1].get("kind") != "embedding"):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in the model") from None
        dtype = _dtype(name, info)
        if info.get("kind") == "embedding":
            shape, want = (info["num_embeddings"], info["embedding_dim"]), nn.Embedding
            replacements[name] = Int8Embedding(*shape, padding_idx=info["padding_idx"], dtype=dtype)
        elif info.get("kind") == "linear":
            shape, want = (info["out_features"], info["in_features"]), nn.Linear
            head = replacements[name] = Int8Linear(info["in_features"], info["out_features"], bias=info["bias"], dtype=dtype)
            if info.get("tied_to"):
                if not isinstance(replacements.get(info["tied_to"]), Int8Embedding):
                    raise CheckpointError(f"layer {name!r} is tied to {info['tied_to']!r}, which the checkpoint does not store as int8")
                head.share_codes_with(replacements[info["tied_to"]])
        else:
            raise CheckpointError(f"int8 layer {name!r} has unknown kind {info.get('kind')!r}")
        if not isinstance(module, want) or tuple(module.weight.shape) != shape:
            got = tuple(module.weight.shape) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
            raise CheckpointError(
                f"layer {name!r}: checkpoint has an int8 {want.__name__} of weight shape {shape}, "
                f"the model has {type(module).__name__} {got}"
            )
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
    if not isinstance(model_or_factory, nn.Module) and not callable(model_or_factory):
        raise TypeError(
            f"load_packed: expected the float model (an nn.Module) or a function building it, "
            f"got {type(model_or_factory).__name__}"
        )
    metadata = _read_metadata(path)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_packed: the model factory {getattr(model_or_factory, '__name__', model_or_factory)!r} "
            f"returned {type(model).__name__}, not an nn.Module (did it forget to return the model?)"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    # Everything is checked against the packed architecture before the user's model is touched.
    replacements: dict[str, nn.Module] = dict(_packed_replacements(model, metadata["layers"]))
    int8_modules = _int8_replacements(model, metadata["int8_layers"])
    replacements.update(int8_modules)
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
        if name.endswith(".codes") and name.rpartition(".")[0] in int8_modules and bool((tensor == -128).any()):
            raise CheckpointError(f"tensor {name!r} holds the int8 code -128, outside the symmetric range [-127, 127]")
        if name.endswith(".scales") and not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
            raise CheckpointError(f"tensor {name!r} has non-finite or non-positive scales")
    missing = set(expected) - set(tensors)
    # a tied int8 head and its embedding name the same codes / scales tensors
    int8_tensors = ((f"{name}.{key}", t) for name, m in int8_modules.items() for key, t in m.named_buffers())
    aliases = _tied_aliases([*model.state_dict(keep_vars=True).items(), *int8_tensors])
    unexplained = sorted(k for k in missing if not (aliases.get(k, set()) & set(tensors)))
    if unexplained:
        raise CheckpointError(f"{path.name} lacks tensor(s) the model needs: {', '.join(unexplained[:5])}")
    for name, layer in replacements.items():
        replace_submodule(model, name, layer)
    model.load_state_dict(tensors, strict=False)
    return model


def _tied_aliases(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, set[str]]:
    """state_dict key → the other keys that name the same tensor."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in named_tensors:
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {name: names - {name} for names in by_tensor.values() for name in names}
