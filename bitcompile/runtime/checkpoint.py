"""Save and load packed models: safetensors (never pickle) plus a metadata header.

The header records the format version, the packed layout (name and version), the scale
convention and, per packed layer, its shape, group size, activation mode and original
dtype. Loading checks, in this order and before the model is touched: the metadata against a
strict schema; the layers it names against the model's modules and shapes (only then is
anything allocated from the declared shapes); every tensor's name, shape, dtype and values
(2-bit code 3, int8 code -128, non-finite or non-positive scales); and that no two tensors
that the model stores as one (tied weights) disagree. Every failure is one
:class:`CheckpointError` line naming the layer or tensor. ``save_packed`` runs the same checks
on what it is about to write, so it never writes a checkpoint that ``load_packed`` refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import Tensor, nn

from bitcompile.kernels.groups import MAX_GROUP_SIZE
from bitcompile.kernels.packing import LAYOUT_NAME, LAYOUT_VERSION
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.layers import PackedTernaryLinear
from bitcompile.runtime.module_tree import linear_view, replace_submodule

FORMAT = "bitcompile-packed"
FORMAT_VERSION = 2  # 2 added "int8_layers" (the int8 head of pack(head="int8")); 1 is still read
READABLE_VERSIONS = ("1", "2")
WEIGHTS_FILE = "model.safetensors"

#: The dtypes a float layer (and so a packed layer's bias) can have.
FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}

_PACKED_KEYS = ("in_features", "out_features", "bias", "group_size", "activations", "original_dtype")
_INT8_KEYS = {
    "embedding": ("kind", "num_embeddings", "embedding_dim", "padding_idx", "original_dtype"),
    "linear": ("kind", "in_features", "out_features", "bias", "original_dtype", "tied_to"),
}
#: state_dict prefixes of the wrappers save_packed unwraps (torch.compile; DDP, DataParallel, FSDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")

def _bounded_repr() -> reprlib.Repr:
    """``repr`` of untrusted metadata values, bounded in depth and length (one short line)."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlist, shown.maxdict = 2, 60, 60, 4, 4
    return shown


_show = _bounded_repr().repr


class CheckpointError(ValueError):
    """A packed checkpoint does not match what it claims to be or the model it is loaded into."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``, DDP, ``nn.DataParallel`` and FSDP wrappers, whose
    state_dict keys would otherwise gain an ``_orig_mod.`` or ``module.`` prefix."""
    while True:
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
        fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or (
            fsdp is not None and isinstance(model, fsdp)
        ):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------------------------
# metadata: written by save_packed, checked against a strict schema before anything else


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


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_header(where: str, metadata: Mapping[str, str]) -> None:
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: metadata format_version={_show(metadata.get('format_version'))}, this version of bitcompile "
            f"reads format_version in {READABLE_VERSIONS}"
        )
    expected = {"format": FORMAT, "layout": LAYOUT_NAME, "layout_version": str(LAYOUT_VERSION),
                "scale_convention": "multiplier"}  # fmt: skip
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise CheckpointError(
                f"{where}: metadata {key}={_show(metadata.get(key))}, this version of bitcompile reads {key}={value!r}"
            )


def _json_object(where: str, metadata: Mapping[str, str], key: str, default: str | None) -> dict:
    text = metadata.get(key, default)
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: metadata {key!r} is missing")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:  # bad JSON, too-long ints, nesting deeper than Python recurses
        raise CheckpointError(f"{where}: metadata {key!r} is not valid JSON ({type(error).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: metadata {key!r} is {_json_type(value)}, expected an object of layer name -> layer")
    return value


class _Fields:
    """Typed reads of one layer's metadata entry; every failure names the layer and the key."""

    def __init__(self, where: str, name: str, info: Any, keys: Iterable[str]) -> None:
        self.prefix = f"{where}: layer {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.prefix}: metadata is {_json_type(info)}, expected an object")
        keys = tuple(keys)
        if missing := [k for k in keys if k not in info]:
            raise CheckpointError(f"{self.prefix}: metadata lacks {', '.join(map(repr, missing))}")
        if unknown := sorted(set(info) - set(keys)):
            raise CheckpointError(f"{self.prefix}: metadata has unknown key(s) {_show(unknown)}")
        self.info = info

    def error(self, key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.prefix}: metadata {key}={_show(self.info[key])} is invalid: expected {expected}")

    def count(self, key: str) -> int:
        value = self.info[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(key, "a positive integer")
        return value

    def flag(self, key: str) -> bool:
        if not isinstance(self.info[key], bool):
            raise self.error(key, "true or false")
        return self.info[key]

    def dtype(self) -> torch.dtype:
        value = self.info["original_dtype"]
        if not isinstance(value, str) or value not in FLOAT_DTYPES:
            raise self.error("original_dtype", f"one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[value]


def _packed_layer(where: str, name: str, info: Any) -> dict:
    fields = _Fields(where, name, info, _PACKED_KEYS)
    group_size = info["group_size"]
    if not (group_size == "tensor" or (type(group_size) is int and (group_size == -1 or 0 < group_size <= MAX_GROUP_SIZE))):
        raise fields.error("group_size", "-1, 'tensor' or a positive integer below 2**31")
    if not (info["activations"] is None or info["activations"] == "int8"):
        raise fields.error("activations", "'int8' or null")
    return {
        "in_features": fields.count("in_features"), "out_features": fields.count("out_features"),
        "bias": fields.flag("bias"), "group_size": group_size, "activations": info["activations"],
        "dtype": fields.dtype(),
    }  # fmt: skip


def _int8_layer(where: str, name: str, info: Any) -> dict:
    kind = info.get("kind") if isinstance(info, dict) else None
    if not isinstance(kind, str) or kind not in _INT8_KEYS:
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: int8 layer {name!r}: metadata is {_json_type(info)}, expected an object")
        raise CheckpointError(f"{where}: int8 layer {name!r} has unknown kind {_show(kind)} (expected 'embedding' or 'linear')")
    fields = _Fields(where, name, info, _INT8_KEYS[kind])
    if kind == "embedding":
        rows, dim = fields.count("num_embeddings"), fields.count("embedding_dim")
        padding_idx = info["padding_idx"]
        if padding_idx is not None and not (type(padding_idx) is int and 0 <= padding_idx < rows):
            raise fields.error("padding_idx", f"null or an integer in [0, {rows})")
        return {"kind": kind, "shape": (rows, dim), "padding_idx": padding_idx, "dtype": fields.dtype()}
    tied_to = info["tied_to"]
    if tied_to is not None and not isinstance(tied_to, str):
        raise fields.error("tied_to", "null or the name of an int8 embedding")
    return {
        "kind": kind, "shape": (fields.count("out_features"), fields.count("in_features")), "bias": fields.flag("bias"),
        "dtype": fields.dtype(), "tied_to": tied_to,
    }  # fmt: skip


def _check_names(where: str, names: list[str]) -> None:
    """Non-empty dotted module paths, each listed once, none inside another replaced layer."""
    listed = set()
    for name in names:
        if not name or any(not part for part in name.split(".")):
            raise CheckpointError(f"{where}: layer name {name!r} is not a dotted module path")
        if name in listed:
            raise CheckpointError(f"{where}: layer {name!r} is listed both as packed and as int8")
        listed.add(name)
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts)):
            if (outer := ".".join(parts[:end])) in listed:
                raise CheckpointError(f"{where}: layer {name!r} lies inside layer {outer!r}, which is replaced too")


def _parse_metadata(where: str, metadata: Mapping[str, str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The packed and int8 layers of a checkpoint's metadata, after the strict schema check."""
    _check_header(where, metadata)
    raw_layers = _json_object(where, metadata, "layers", None)
    raw_int8 = _json_object(where, metadata, "int8_layers", "{}")
    if not raw_layers:
        raise CheckpointError(f"{where}: metadata 'layers' lists no packed layer")
    layers = {name: _packed_layer(where, name, info) for name, info in raw_layers.items()}
    int8_layers = {name: _int8_layer(where, name, info) for name, info in raw_int8.items()}
    _check_names(where, [*layers, *int8_layers])
    for name, info in int8_layers.items():
        if info["kind"] == "linear" and info["tied_to"] is not None:
            embedding = int8_layers.get(info["tied_to"])
            if embedding is None or embedding["kind"] != "embedding":
                raise CheckpointError(
                    f"{where}: layer {name!r} is tied to {info['tied_to']!r}, which the checkpoint does not store as int8"
                )
            if embedding["shape"] != info["shape"]:
                raise CheckpointError(
                    f"{where}: layer {name!r} of shape {info['shape']} is tied to {info['tied_to']!r} "
                    f"of shape {embedding['shape']}"
                )
    return layers, int8_layers


def _strip_wrapper_prefixes(
    layers: dict[str, dict], int8_layers: dict[str, dict], tensors: dict[str, Tensor], model: nn.Module
) -> tuple[dict[str, dict], dict[str, dict], dict[str, Tensor]]:
    """Names written by an older save_packed of a wrapped model (``_orig_mod.fc``), made the
    model's own (``fc``) when every name has the prefix and the model has no such child."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            names = [*layers, *int8_layers, *tensors]
            if prefix[:-1] in model._modules or not all(n.startswith(prefix) for n in names):
                continue
            cut = len(prefix)
            layers = {n[cut:]: info for n, info in layers.items()}
            int8_layers = {
                n[cut:]: {**info, "tied_to": info["tied_to"][cut:]} if (info.get("tied_to") or "").startswith(prefix) else info
                for n, info in int8_layers.items()
            }  # fmt: skip
            tensors = {n[cut:]: t for n, t in tensors.items()}
            stripped = True
    return layers, int8_layers, tensors


# ---------------------------------------------------------------------------------------------
# the model: checked against the metadata before anything is allocated from it


def _module(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    module = modules.get(name)
    if module is None:
        raise CheckpointError(f"checkpoint layer {name!r} does not exist in the model")
    return module


def _int8_model_shape(module: nn.Module, kind: str) -> tuple[int, ...] | None:
    if isinstance(module, Int8Embedding if kind == "embedding" else Int8Linear):
        return tuple(module.codes.shape)
    if isinstance(module, nn.Embedding if kind == "embedding" else nn.Linear):
        return tuple(module.weight.shape)
    return None


def _replacements(
    model: nn.Module, layers: dict[str, dict], int8_layers: dict[str, dict], device: torch.device | str | None = None
) -> dict[str, nn.Module]:
    """Empty packed and int8 modules of the recorded shapes for the listed layers of ``model``
    (which is not touched); every shape is compared with the model's before it is allocated."""
    modules = dict(model.named_modules(remove_duplicate=False))  # registered children only: no properties
    for name, info in layers.items():
        module = _module(modules, name)
        view = module if isinstance(module, PackedTernaryLinear) else linear_view(module)
        if view is None:
            raise CheckpointError(f"layer {name!r}: expected nn.Linear in the model, found {type(module).__name__}")
        shape, have = (info["out_features"], info["in_features"]), (view.out_features, view.in_features)
        if have != shape:
            raise CheckpointError(f"layer {name!r}: checkpoint has (out, in) = {shape}, the model has {have}")
    for name, info in int8_layers.items():
        module = _module(modules, name)
        if _int8_model_shape(module, info["kind"]) != info["shape"]:
            want = "Embedding" if info["kind"] == "embedding" else "Linear"
            got = tuple(module.weight.shape) if isinstance(getattr(module, "weight", None), Tensor) else None
            raise CheckpointError(
                f"layer {name!r}: checkpoint has an int8 {want} of weight shape {info['shape']}, "
                f"the model has {type(module).__name__} {got}"
            )
    replacements: dict[str, nn.Module] = {}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        for name, info in layers.items():
            replacements[name] = PackedTernaryLinear(
                info["in_features"], info["out_features"], bias=info["bias"], group_size=info["group_size"],
                activations=info["activations"], dtype=info["dtype"],
            )  # fmt: skip
        for name, info in sorted(int8_layers.items(), key=lambda item: item[1]["kind"] != "embedding"):
            if info["kind"] == "embedding":
                replacements[name] = Int8Embedding(*info["shape"], padding_idx=info["padding_idx"], dtype=info["dtype"])
            else:
                head = replacements[name] = Int8Linear(info["shape"][1], info["shape"][0], bias=info["bias"], dtype=info["dtype"])
                if info["tied_to"] is not None:
                    head.share_codes_with(replacements[info["tied_to"]])
    return replacements


# ---------------------------------------------------------------------------------------------
# tensors: names, shapes, dtypes, values, ties


def _expected_state(model: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """The state_dict (the tensors themselves) the model will have once ``replacements`` are swapped in."""
    state = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if not any(k.startswith(n + ".") for n in replacements)
    }
    for name, layer in replacements.items():
        state.update({f"{name}.{k}": v for k, v in layer.state_dict(keep_vars=True).items()})
    return state


def _storage_key(tensor: Tensor) -> tuple:
    """Equal for two names of one tensor (tied parameters, shared buffers, ``.data`` sharing)."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return ("object", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)  # fmt: skip


def _tied_names(named_tensors: Iterable[tuple[str, Tensor]]) -> list[list[str]]:
    """Groups of state_dict keys that name one tensor (only groups of two or more)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in named_tensors:
        groups.setdefault(_storage_key(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (``torch.equal`` calls two identical NaN tensors different)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def _check_codes(name: str, packed: Tensor) -> None:
    for shift in (0, 2, 4, 6):
        bad = ((packed >> shift) & 3) == 3
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CheckpointError(f"tensor {name!r} holds the 2-bit code 3 (row {row}), which is not a ternary value")


def _check_values(name: str, tensor: Tensor, module: nn.Module) -> None:
    """What a packed or int8 module's tensors must hold beyond their shape and dtype."""
    key = name.rpartition(".")[2]
    if key == "packed" and isinstance(module, PackedTernaryLinear):
        _check_codes(name, tensor)
    elif key == "codes" and bool((tensor == -128).any()):
        raise CheckpointError(f"tensor {name!r} holds the int8 code -128, outside the symmetric range [-127, 127]")
    elif key == "scales" and not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
        raise CheckpointError(f"tensor {name!r} has non-finite or non-positive scales")


def _check_tensors(
    tensors: Mapping[str, Tensor], model: nn.Module, replacements: Mapping[str, nn.Module], source: str
) -> None:
    """Every tensor has a place of its shape and dtype, holds valid values, no tied pair
    disagrees and nothing the model needs is missing. ``source``: "checkpoint" or "model"."""
    expected = _expected_state(model, replacements)
    for name, tensor in tensors.items():
        want = expected.get(name)
        if want is None:
            raise CheckpointError(f"tensor {name!r} in the {source} has no place in the model")
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {name!r}: {source} has {tensor.dtype} {tuple(tensor.shape)}, "
                f"the packed model expects {want.dtype} {tuple(want.shape)}"
            )
        owner = replacements.get(name.rpartition(".")[0])
        if owner is not None:
            _check_values(name, tensor, owner)
    present = set(tensors)
    covered = set(present)
    for names in _tied_names(expected.items()):
        stored = [n for n in names if n in present]
        for other in stored[1:]:
            if not _same_bits(tensors[stored[0]], tensors[other]):
                raise CheckpointError(
                    f"tensors {stored[0]!r} and {other!r} of the {source} differ, but the model ties them "
                    "(one shared tensor): an untied checkpoint does not fit a tied model"
                )
        if stored:
            covered.update(names)
    if missing := sorted(set(expected) - covered):
        raise CheckpointError(f"the {source} lacks tensor(s) the model needs: {', '.join(missing[:5])}")


# ---------------------------------------------------------------------------------------------
# the public functions


def save_packed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory/model.safetensors`` with every tensor of a packed model and its metadata.

    ``model`` may be wrapped (``torch.compile``, DDP, ``nn.DataParallel``, FSDP): the names
    written are the wrapped model's own. Before anything is written, the checkpoint is checked
    exactly as :func:`load_packed` checks it (a NaN scale, a layer whose shape or dtype disagrees
    with its metadata, ...), so a checkpoint that would not load is never written; it is
    written to a temporary file and renamed, so a failed save leaves an existing one intact.

    Raises:
        CheckpointError: the model has no packed layer, or holds something a checkpoint cannot.
    """
    model = unwrap_model(model)
    layers = {name: _layer_metadata(m) for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    if not layers:
        raise CheckpointError("save_packed: the model has no PackedTernaryLinear layers; call bitcompile.pack(model) first")
    int8_layers = _int8_metadata(model)
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
    try:
        parsed_layers, parsed_int8 = _parse_metadata("packed model", metadata)
        replacements = _replacements(model, parsed_layers, parsed_int8, device="meta")  # shapes only
        _check_tensors(model.state_dict(), model, replacements, "model")
    except CheckpointError as error:
        raise CheckpointError(f"save_packed: not writing a checkpoint load_packed would refuse: {error}") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS_FILE
    handle, temporary = tempfile.mkstemp(dir=out, prefix=".model.", suffix=".safetensors.tmp")
    os.close(handle)
    try:
        save_model(model, temporary, metadata=metadata)  # drops duplicate names of tied tensors
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return metadata, load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {' '.join(str(error).split())}") from None


def load_packed(directory: str | Path, model_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Load a checkpoint written by :func:`save_packed` into a model of the same architecture.

    ``model_or_factory`` is the float model (or a function building it), possibly wrapped by
    ``torch.compile`` / DDP / FSDP; its listed linear layers are replaced by packed ones and
    every tensor is loaded bit-exactly. The model is only modified once everything checked out.

    Returns:
        the model (the wrapper when one was given).

    Raises:
        CheckpointError: one line naming the file, layer or tensor that is wrong.
    """
    path = Path(directory) / WEIGHTS_FILE if Path(directory).is_dir() else Path(directory)
    if not path.exists():
        raise CheckpointError(f"no packed checkpoint at {path}")
    if not isinstance(model_or_factory, nn.Module) and not callable(model_or_factory):
        raise TypeError(
            f"load_packed: expected the float model (an nn.Module) or a function building it, "
            f"got {type(model_or_factory).__name__}"
        )
    metadata, tensors = _read(path)
    layers, int8_layers = _parse_metadata(path.name, metadata)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_packed: the model factory {getattr(model_or_factory, '__name__', model_or_factory)!r} "
            f"returned {type(model).__name__}, not an nn.Module (did it forget to return the model?)"
        )
    target = unwrap_model(model)
    layers, int8_layers, tensors = _strip_wrapper_prefixes(layers, int8_layers, tensors, target)
    replacements = _replacements(target, layers, int8_layers)
    _check_tensors(tensors, target, replacements, "checkpoint")
    for name, layer in replacements.items():
        replace_submodule(target, name, layer)
    target.load_state_dict(tensors, strict=False)
    return model
