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
The header and its schema are in :mod:`bitcompile.runtime.checkpoint_format`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import Tensor, nn

from bitcompile.config import BitcompileWarning
from bitcompile.kernels import packing_base3
from bitcompile.runtime.checkpoint_format import (  # FORMAT*, READABLE_VERSIONS: re-exported for BC
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    CheckpointError,
    model_metadata,
    parse_float_gemv_layers,
    parse_metadata,
)
from bitcompile.runtime.experts import install_expert_skeletons
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.layers import FloatGemvLinear, PackedTernaryLinear, float_gemv_refusal
from bitcompile.runtime.module_tree import linear_view, replace_submodule

__all__ = [
    "FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "WEIGHTS_FILE", "CheckpointError", "load_packed", "save_packed",
    "unwrap_model",
]  # fmt: skip

WEIGHTS_FILE = "model.safetensors"

#: state_dict prefixes of the wrappers save_packed unwraps (torch.compile; DDP, DataParallel, FSDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


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
                activations=info["activations"], dtype=info["dtype"], layout=info["layout"],
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


def _check_codes(name: str, packed: Tensor, layout: str) -> None:
    if layout == "1.6bit":
        bad = packing_base3.invalid_bytes(packed)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CheckpointError(
                f"tensor {name!r} holds a byte that is no 1.6-bit code (row {row}: |V| > 121 or a negative zero)"
            )
        return
    for shift in (0, 2, 4, 6):
        bad = ((packed >> shift) & 3) == 3
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CheckpointError(f"tensor {name!r} holds the 2-bit code 3 (row {row}), which is not a ternary value")


def _check_values(name: str, tensor: Tensor, module: nn.Module) -> None:
    """What a packed or int8 module's tensors must hold beyond their shape and dtype."""
    key = name.rpartition(".")[2]
    if key == "packed" and isinstance(module, PackedTernaryLinear):
        _check_codes(name, tensor, module.layout)
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
    metadata = model_metadata(model)
    try:
        parsed_layers, parsed_int8 = parse_metadata("packed model", metadata)
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
    layers, int8_layers = parse_metadata(path.name, metadata)
    gemv_names = parse_float_gemv_layers(path.name, metadata)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_packed: the model factory {getattr(model_or_factory, '__name__', model_or_factory)!r} "
            f"returned {type(model).__name__}, not an nn.Module (did it forget to return the model?)"
        )
    target = unwrap_model(model)
    layers, int8_layers, tensors = _strip_wrapper_prefixes(layers, int8_layers, tensors, target)
    # packed MoE experts are stored per expert (<experts>.gate_up_proj.3); their module goes in
    # first, and back out if a check below refuses the checkpoint
    restore_experts = install_expert_skeletons(target, list(layers))
    try:
        replacements = _replacements(target, layers, int8_layers)
        _check_tensors(tensors, target, replacements, "checkpoint")
        gemv_layers = _float_gemv_layers(target, gemv_names, [*layers, *int8_layers])
    except BaseException:
        restore_experts()
        raise
    for name, layer in replacements.items():
        replace_submodule(target, name, layer)
    target.load_state_dict(tensors, strict=False)
    _serve_float_gemv_layers(gemv_layers)
    return model


def _float_gemv_layers(model: nn.Module, names: list[str], replaced: list[str]) -> dict[str, nn.Module]:
    """The model's modules the checkpoint lists as fp32-GEMV float layers (checked, not changed)."""
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name in replaced:
            raise CheckpointError(f"checkpoint float layer {name!r} is listed as a packed or int8 layer too")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "does not exist in the model" if module is None else f"is a {type(module).__name__} in the model"
            raise CheckpointError(f"checkpoint float layer {name!r} (fp32 GEMV when saved) {what}, expected nn.Linear")
        found[name] = module
    return found


def _serve_float_gemv_layers(layers: dict[str, nn.Module]) -> None:
    """Serve the listed float layers as pack() did: FloatGemvLinear where this process can; the
    others keep F.linear, said once (their outputs differ in the last bits: another summation order)."""
    refused = {}
    for name, module in layers.items():
        why = float_gemv_refusal(module)
        if why is None:
            module.__class__ = FloatGemvLinear
        else:
            refused[name] = why
    if refused:
        name, why = next(iter(refused.items()))
        warnings.warn(
            f"load_packed: {len(refused)} float layers (first: {name!r}: {why}) were served by bitcompile's fp32 "
            "GEMV when saved and run F.linear here; their outputs differ from the saved model's in the last bits "
            "(another summation order)",
            BitcompileWarning,
            stacklevel=3,
        )
