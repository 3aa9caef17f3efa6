"""Lossless import of ternary GGUF files: ``TQ1_0`` / ``TQ2_0`` tensors become packed layers.

``load_gguf_ternary(path)`` reads a Llama GGUF file (llama.cpp's names, see
:mod:`bitcompile.runtime.gguf_llama`) and returns a transformers ``LlamaForCausalLM`` whose
ternary layers are :class:`PackedTernaryLinear` holding the file's codes and block scales
exactly (the fp16 ``d`` of each block, widened to fp32). Nothing goes through a float weight.
BitCPM-CANN publishes TQ2_0 files; :func:`bitcompile.export.gguf.export_gguf` writes them too.

Which tensors are ternary: every ``TQ1_0`` / ``TQ2_0`` tensor, and the ``Q4_0`` / ``Q8_0`` /
``F16`` tensors a bitcompile export lists in ``bitcompile.ternary_tensors`` (their values are
checked to be ternary). Scale groups: the ones recorded in ``bitcompile.group_sizes``, else
per row when every block of a row has one ``d``, else one group per block (256 for TQ types).
Other tensors (embeddings, norms, a float head) are loaded as float; a quantized float type
(Q4_K ...) is dequantized with a BitcompileWarning naming it.

Returns ``None`` for a file with no ternary tensor, so a float GGUF loader can be tried next.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitcompile.config import BitcompileWarning, TernaryConfig
from bitcompile.kernels.groups import PER_ROW, PER_TENSOR, ScaleGroups
from bitcompile.runtime.gguf_blocks import BLOCK, TERNARY_TYPES, decode
from bitcompile.runtime.gguf_llama import ARCH, GgufFormatError, config_from_metadata, hf_name, rope_permutation
from bitcompile.runtime.layers import PackedTernaryLinear
from bitcompile.runtime.prequantized import detect_ternary
from bitcompile.runtime.module_tree import replace_submodule

__all__ = ["load_gguf_ternary", "ternary_tensor_names"]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def ternary_tensor_names(reader: Any) -> list[str]:
    """Names of the tensors of an open ``gguf.GGUFReader`` that hold ternary weights."""
    listed = set(_field(reader, "bitcompile.ternary_tensors", []) or [])
    return [t.name for t in reader.tensors if t.tensor_type.name in TERNARY_TYPES or t.name in listed]


def _parse_groups(recorded: str) -> ScaleGroups:
    return ScaleGroups.parse(int(recorded) if recorded.lstrip("-").isdigit() else recorded)


def _groups_of(name: str, block_scales: np.ndarray, block: int, recorded: str | None) -> ScaleGroups:
    """The scale groups that explain a tensor's block scales (coarsest first), checked."""
    per_row = bool((block_scales == block_scales[:, :1]).all())
    if recorded is not None:
        groups = _parse_groups(recorded)
        if groups.code == PER_TENSOR and not (block_scales == block_scales.flat[0]).all():
            raise GgufFormatError(f"tensor {name!r}: bitcompile.group_sizes says per-tensor but its block scales differ")
        if groups.code == PER_ROW and not per_row:
            raise GgufFormatError(f"tensor {name!r}: bitcompile.group_sizes says per-row but a row's block scales differ")
        if groups.code > 0 and groups.code % block == 0:
            width = groups.code // block
            padded = np.pad(block_scales, ((0, 0), (0, -block_scales.shape[1] % width)), mode="edge")
            grouped = padded.reshape(block_scales.shape[0], -1, width)
            if not (grouped == grouped[:, :, :1]).all():
                raise GgufFormatError(f"tensor {name!r}: block scales differ within a group of {groups.code}")
        elif groups.code > 0 and groups.code != block:
            raise GgufFormatError(f"tensor {name!r}: group size {groups.code} is not a multiple of the {block}-wide blocks")
        return groups
    return ScaleGroups.per_row() if per_row else ScaleGroups.of(block)


def _ternary_layer(tensor: Any, recorded: str | None, activations: str | None, target: str) -> PackedTernaryLinear:
    kind = tensor.tensor_type.name
    k, n = (int(v) for v in tensor.shape[:2])
    if kind in BLOCK:
        codes, block_scales = decode(np.asarray(tensor.data), kind, k)
        block = BLOCK[kind]
    elif kind in ("F16", "F32"):  # bitcompile's last resort: the values ±s, s per recorded group
        groups = _parse_groups(recorded) if recorded is not None else ScaleGroups.per_row()
        values = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(n, k))
        found = detect_ternary(values, groups.code)
        if found is None:
            raise GgufFormatError(f"tensor {tensor.name!r}: listed as ternary but its {kind} values are not ±s per {groups.label} group")
        config = TernaryConfig(group_size=groups, activations=activations, target=target)
        return PackedTernaryLinear.from_codes(found[0], found[1], None, config, torch.float32)
    else:
        raise GgufFormatError(f"tensor {tensor.name!r}: type {kind} cannot hold ternary weights losslessly")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise GgufFormatError(f"tensor {tensor.name!r}: {kind} values outside {{-1, 0, 1}}; it is not ternary")
    groups = _groups_of(tensor.name, block_scales, block, recorded)
    first_block = [0] if groups.code <= 0 else list(range(0, k // block, max(groups.code // block, 1)))
    scales = torch.from_numpy(block_scales[:, first_block].astype(np.float32))
    config = TernaryConfig(group_size=groups, activations=activations, target=target)
    return PackedTernaryLinear.from_codes(torch.from_numpy(codes), scales, None, config, torch.float32)


def _float_tensor(tensor: Any) -> torch.Tensor:
    import gguf

    kind = tensor.tensor_type.name
    if kind not in ("F32", "F16", "BF16"):
        warnings.warn(
            f"load_gguf_ternary: tensor {tensor.name!r} is {kind}; it is dequantized to float (not a ternary layer)",
            BitcompileWarning,
            stacklevel=3,
        )
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = [int(v) for v in reversed(tensor.shape)] if len(tensor.shape) > 1 else [int(tensor.shape[0])]
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a writable copy


def load_gguf_ternary(path: str | os.PathLike, *, target: str = "auto") -> nn.Module | None:
    """A packed ``LlamaForCausalLM`` from a GGUF file's ternary tensors, or ``None`` if it has none.

    Args:
        path: a ``.gguf`` file with llama.cpp's Llama tensor names.
        target: the packed layers' kernel target (``"auto"``, ``"cpu"``, ``"reference"`` ...).

    Returns:
        The model in eval mode (``bitcompile_import_sources`` maps each packed layer to
        ``"gguf TQ2_0 (lossless)"`` ...), or ``None`` when no tensor is ternary.

    Raises:
        GgufFormatError: an unsupported architecture, a missing tensor or key, or a tensor
            listed as ternary that is not; the message names the tensor.
    """
    import gguf
    from transformers import LlamaForCausalLM

    path = Path(os.fspath(path))
    reader = gguf.GGUFReader(str(path))
    names = ternary_tensor_names(reader)
    if not names:
        return None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise GgufFormatError(f"{str(path)!r}: architecture {arch!r}; load_gguf_ternary reads {ARCH!r} files")
    listed = list(_field(reader, "bitcompile.ternary_tensors", []) or [])
    recorded_groups = dict(zip(listed, _field(reader, "bitcompile.group_sizes", []) or []))
    activations = "int8" if _field(reader, "bitcompile.activations", "int8") == "int8" else None
    keys = [k for k in reader.fields if k.startswith(f"{ARCH}.") or k.startswith("tokenizer.ggml.") and k.endswith("_id")]
    fields = {k: _field(reader, k) for k in keys}
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise GgufFormatError(f"{str(path)!r} has no token_embd.weight")
    vocab = int(by_name["token_embd.weight"].shape[1])
    config = config_from_metadata(fields, tied="output.weight" not in by_name, vocab_size=vocab)
    model = LlamaForCausalLM(config).eval()
    modules = dict(model.named_modules())
    sources, assigned, packed = {}, set(), {}
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        module_name = hf_name(base)
        if module_name is None or module_name not in modules:
            raise GgufFormatError(f"{str(path)!r}: tensor {tensor.name!r} has no place in a transformers Llama")
        module = modules[module_name]
        if tensor.name in names and suffix == "weight":
            layer = _ternary_layer(tensor, recorded_groups.get(tensor.name), activations, target)
            perm = rope_permutation(module_name, layer.out_features, config)
            if perm is not None:  # GGUF rows are hf_rows[perm]
                inverse = torch.argsort(perm)
                layer = PackedTernaryLinear.from_codes(
                    layer.codes()[inverse], layer.scales[inverse], None,
                    TernaryConfig(group_size=layer.group_size, activations=activations, target=target), torch.float32,
                )  # fmt: skip
            if (layer.out_features, layer.in_features) != (module.out_features, module.in_features):
                raise GgufFormatError(
                    f"tensor {tensor.name!r}: shape {(layer.out_features, layer.in_features)} does not match "
                    f"{module_name} {(module.out_features, module.in_features)}"
                )
            packed[module_name] = layer
            sources[module_name] = f"gguf {tensor.tensor_type.name} (lossless)"
            assigned.add(f"{module_name}.weight")
            continue
        value = _float_tensor(tensor)
        perm = rope_permutation(module_name, value.shape[0], config) if base.endswith(("attn_q", "attn_k")) else None
        if perm is not None:
            value = value[torch.argsort(perm)]
        target_param = getattr(module, suffix, None)
        if not isinstance(target_param, torch.Tensor) or tuple(target_param.shape) != tuple(value.shape):
            raise GgufFormatError(f"tensor {tensor.name!r}: shape {tuple(value.shape)} does not fit {module_name}.{suffix}")
        with torch.no_grad():
            target_param.copy_(value)
        assigned.add(f"{module_name}.{suffix}")
    for name, layer in packed.items():  # biases of packed layers come from their float tensors
        bias = getattr(modules[name], "bias", None)
        if bias is not None:
            layer.bias = bias.detach().clone()
        replace_submodule(model, name, layer)
    expected = {n for n, _ in modules["model"].named_parameters(prefix="model")}
    if not config.tie_word_embeddings:
        expected.add("lm_head.weight")
    missing = sorted(expected - assigned)
    if missing:
        raise GgufFormatError(f"{str(path)!r} has no tensor for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    model.bitcompile_import_sources = sources  # pack() turns these into its PackDecision rows
    return model
