"""The metadata header of a packed checkpoint: what ``save_packed`` writes and the strict
schema ``load_packed`` checks it against before anything else (:mod:`bitcompile.runtime.checkpoint`).

Untrusted values are shown bounded (:func:`show`), and every failure is one
:class:`CheckpointError` line naming the layer and the key.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from bitcompile.kernels.groups import ScaleGroups
from bitcompile.kernels.packing import LAYOUT_NAME, LAYOUT_VERSION
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.layers import LAYOUTS, FloatGemvLinear, PackedTernaryLinear

__all__ = [
    "FLOAT_DTYPES", "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "CheckpointError", "model_metadata",
    "parse_float_gemv_layers", "parse_metadata", "show",
]  # fmt: skip

FORMAT = "bitcompile-packed"
# 2 added "int8_layers" (the int8 head of pack(head="int8")); 3 a per-layer "layout" (the
# 1.6-bit layout of pack(layout="1.6bit")). 1 and 2 are still read (every layer 2-bit).
FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")

#: The dtypes a float layer (and so a packed layer's bias) can have.
FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}

_PACKED_KEYS = ("in_features", "out_features", "bias", "group_size", "activations", "original_dtype")
#: optional per packed layer (format 3): the layout of its bytes, absent for the header's 2-bit layout
_LAYOUT_KEY = "layout"
#: the per-layer "layout" value (name vN) of each pack(layout=) choice other than the header's
_LAYER_LAYOUTS = {f"{name} v{version}": key for key, (name, version) in LAYOUTS.items() if key != "2bit"}
#: optional, any format version: the fp32 nn.Linear layers pack() served with bitcompile's fp32
#: GEMV (FloatGemvLinear), so that load_packed serves them the same way (not F.linear's sums)
_FLOAT_GEMV_KEY = "float_gemv_layers"
_INT8_KEYS = {
    "embedding": ("kind", "num_embeddings", "embedding_dim", "padding_idx", "original_dtype"),
    "linear": ("kind", "in_features", "out_features", "bias", "original_dtype", "tied_to"),
}
def _bounded_repr() -> reprlib.Repr:
    """``repr`` of untrusted metadata values, bounded in depth and length (one short line)."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlist, shown.maxdict = 2, 60, 60, 4, 4
    return shown


#: ``repr`` for values read from a checkpoint: one short line whatever they hold
show = _bounded_repr().repr


class CheckpointError(ValueError):
    """A packed checkpoint does not match what it claims to be or the model it is loaded into."""


def _layer_metadata(layer: PackedTernaryLinear) -> dict:
    info = {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "group_size": layer.group_size.option,
        "activations": layer.activations,
        "original_dtype": str(layer.original_dtype).removeprefix("torch."),
    }
    if layer.layout != "2bit":
        name, version = LAYOUTS[layer.layout]
        info[_LAYOUT_KEY] = f"{name} v{version}"
    return info


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


def model_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors metadata header ``save_packed`` writes for a packed (unwrapped) ``model``.

    Raises:
        CheckpointError: the model has no packed layer.
    """
    layers = {name: _layer_metadata(m) for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    if not layers:
        raise CheckpointError("save_packed: the model has no PackedTernaryLinear layers; call bitcompile.pack(model) first")
    int8_layers = _int8_metadata(model)
    # the lowest version that holds everything, so older bitcompile still reads what it can
    version = 3 if any(_LAYOUT_KEY in info for info in layers.values()) else 2 if int8_layers else 1
    metadata = {
        "format": FORMAT,
        "format_version": str(version),
        "layout": LAYOUT_NAME,
        "layout_version": str(LAYOUT_VERSION),
        "scale_convention": "multiplier",
        "layers": json.dumps(layers),
        "int8_layers": json.dumps(int8_layers),
    }
    gemv = sorted(name for name, m in model.named_modules() if isinstance(m, FloatGemvLinear))
    if gemv:  # older readers ignore the key and serve these layers with F.linear
        metadata[_FLOAT_GEMV_KEY] = json.dumps(gemv)
    return metadata


def parse_float_gemv_layers(where: str, metadata: Mapping[str, str]) -> list[str]:
    """The float layers a checkpoint says ``pack`` served with the fp32 GEMV ([] when absent:
    checkpoints written before the key existed)."""
    text = metadata.get(_FLOAT_GEMV_KEY)
    if text is None:
        return []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{where}: metadata {_FLOAT_GEMV_KEY!r} is not valid JSON ({error})") from None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise CheckpointError(f"{where}: metadata {_FLOAT_GEMV_KEY!r} must be an array of layer names, got {show(value)}")
    for name in value:
        if not name or any(not part for part in name.split(".")):
            raise CheckpointError(f"{where}: float layer name {show(name)} in {_FLOAT_GEMV_KEY!r} is not a dotted module path")
    if len(set(value)) != len(value):
        raise CheckpointError(f"{where}: metadata {_FLOAT_GEMV_KEY!r} lists a layer twice")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_header(where: str, metadata: Mapping[str, str]) -> None:
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: metadata format_version={show(metadata.get('format_version'))}, this version of bitcompile "
            f"reads format_version in {READABLE_VERSIONS}"
        )
    expected = {"format": FORMAT, "layout": LAYOUT_NAME, "layout_version": str(LAYOUT_VERSION),
                "scale_convention": "multiplier"}  # fmt: skip
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise CheckpointError(
                f"{where}: metadata {key}={show(metadata.get(key))}, this version of bitcompile reads {key}={value!r}"
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

    def __init__(self, where: str, name: str, info: Any, keys: Iterable[str], optional: Iterable[str] = ()) -> None:
        self.prefix = f"{where}: layer {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.prefix}: metadata is {_json_type(info)}, expected an object")
        keys = tuple(keys)
        if missing := [k for k in keys if k not in info]:
            raise CheckpointError(f"{self.prefix}: metadata lacks {', '.join(map(repr, missing))}")
        if unknown := sorted(set(info) - set(keys) - set(optional)):
            raise CheckpointError(f"{self.prefix}: metadata has unknown key(s) {show(unknown)}")
        self.info = info

    def error(self, key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.prefix}: metadata {key}={show(self.info[key])} is invalid: expected {expected}")

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


def _packed_layer(where: str, name: str, info: Any, format_version: str) -> dict:
    fields = _Fields(where, name, info, _PACKED_KEYS, optional=(_LAYOUT_KEY,) if format_version == "3" else ())
    layout = "2bit"
    if _LAYOUT_KEY in info:
        if not (isinstance(info[_LAYOUT_KEY], str) and info[_LAYOUT_KEY] in _LAYER_LAYOUTS):
            raise fields.error(_LAYOUT_KEY, f"one of {', '.join(map(repr, _LAYER_LAYOUTS))} (absent: the header's layout)")
        layout = _LAYER_LAYOUTS[info[_LAYOUT_KEY]]
    try:  # the file spells it as the option does (an int or "tensor"); the layer takes the typed value
        group_size = ScaleGroups.parse(info["group_size"])
    except ValueError:
        raise fields.error("group_size", "-1, 'tensor' or a positive integer below 2**31") from None
    if not (info["activations"] is None or info["activations"] == "int8"):
        raise fields.error("activations", "'int8' or null")
    return {
        "in_features": fields.count("in_features"), "out_features": fields.count("out_features"),
        "bias": fields.flag("bias"), "group_size": group_size, "activations": info["activations"],
        "dtype": fields.dtype(), "layout": layout,
    }  # fmt: skip


def _int8_layer(where: str, name: str, info: Any) -> dict:
    kind = info.get("kind") if isinstance(info, dict) else None
    if not isinstance(kind, str) or kind not in _INT8_KEYS:
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: int8 layer {name!r}: metadata is {_json_type(info)}, expected an object")
        raise CheckpointError(f"{where}: int8 layer {name!r} has unknown kind {show(kind)} (expected 'embedding' or 'linear')")
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


def parse_metadata(where: str, metadata: Mapping[str, str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The packed and int8 layers of a checkpoint's metadata, after the strict schema check."""
    _check_header(where, metadata)
    raw_layers = _json_object(where, metadata, "layers", None)
    raw_int8 = _json_object(where, metadata, "int8_layers", "{}")
    if not raw_layers:
        raise CheckpointError(f"{where}: metadata 'layers' lists no packed layer")
    layers = {name: _packed_layer(where, name, info, metadata["format_version"]) for name, info in raw_layers.items()}
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
