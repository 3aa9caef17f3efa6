"""``export_hf_bitnet``: a packed model as a Hugging Face BitNet checkpoint (issue 17).

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` into ``BitLinear``
layers (``quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear",
"quantization_mode": "offline"}``), and back into bitcompile with ``bitcompile.pack(folder)``
(:mod:`bitcompile.runtime.hf_bitnet` has the layout).

HF BitNet has one ``weight_scale`` per tensor. A layer packed with per-tensor scales is
written with its codes exactly and ``weight_scale`` a reciprocal chosen so that
``1 / weight_scale`` gives back bitcompile's fp32 ``s`` bit for bit where such an fp32 value
exists (88 % of random scales measured), else within one fp32 ulp. A layer with per-row or per-group scales cannot
be: the export refuses it with one line naming the layer, unless ``lossy_scales=True``, which
keeps the codes and writes the non-zero-weighted mean of the layer's scales (a
BitcompileWarning says how far the scales spread).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcompile.config import BitcompileWarning
from bitcompile.runtime.hf_bitnet import VALUES_PER_BYTE, pack_bitnet_weight
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.layers import PackedTernaryLinear

__all__ = ["HfBitnetExportError", "export_hf_bitnet", "inverse_scale"]


class HfBitnetExportError(ValueError):
    """A packed model (or one of its layers, named) that HF BitNet cannot hold."""


def inverse_scale(scale: float) -> torch.Tensor:
    """fp32 ``w`` with ``1 / w == scale`` in fp32 if one lies within 4 ulps of ``1 / scale``, else ``1 / scale``."""
    s = torch.tensor(scale, dtype=torch.float32)
    w = 1.0 / s
    candidates = [w]
    up, down = w, w
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
        candidates += [up, down]
    return next((c for c in candidates if torch.equal(1.0 / c, s)), w).reshape(1)


def _layer_scale(name: str, layer: PackedTernaryLinear, lossy: bool) -> tuple[float, float]:
    """The one scale HF BitNet stores, and the largest relative change it makes to the layer's scales."""
    from bitcompile.kernels.groups import expand_scales

    scales = layer.scales.float()
    if bool((scales == scales.flatten()[0]).all()):
        return float(scales.flatten()[0]), 0.0
    if not lossy:
        raise HfBitnetExportError(
            f"layer {name!r} has {layer.group_size.label} scales; HF BitNet stores one weight_scale per tensor. "
            "Pack with group_size='tensor', or pass lossy_scales=True to write one mean scale (codes kept)"
        )
    nonzero = layer.codes() != 0
    expanded = expand_scales(scales, layer.in_features, layer.group_code)
    mean = float(expanded[nonzero].mean()) if bool(nonzero.any()) else float(scales.mean())
    return mean, float(((scales - mean).abs() / scales).max())


def export_hf_bitnet(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
    lossy_scales: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a packed transformers model as an HF BitNet folder (config.json + model.safetensors).

    Args:
        model: a transformers model packed by :func:`bitcompile.pack` (int8 activations).
        folder: the folder to write (created).
        tokenizer: saved into the folder too when given.
        lossy_scales: write per-row / per-group layers with one mean scale instead of refusing.
        overwrite: write into an existing non-empty folder.

    Returns:
        The folder's path.
    """
    from safetensors.torch import save_file

    folder = Path(os.fspath(folder))
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"export_hf_bitnet: {str(folder)!r} is not empty; pass overwrite=True to write into it")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise HfBitnetExportError(f"export_hf_bitnet writes transformers models (with .config); got {type(model).__name__}")
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    if not packed:
        raise HfBitnetExportError("export_hf_bitnet: the model has no PackedTernaryLinear layer; run bitcompile.pack(model) first")
    tensors: dict[str, torch.Tensor] = {}
    spread = {}
    for name, layer in packed.items():
        if not layer.quantize_activations:
            raise HfBitnetExportError(f"layer {name!r} is weight-only; HF BitLinear always quantizes activations to int8")
        if layer.out_features % VALUES_PER_BYTE:
            raise HfBitnetExportError(
                f"layer {name!r}: out_features={layer.out_features} is not a multiple of 4, which HF BitLinear needs"
            )
        scale, spread[name] = _layer_scale(name, layer, lossy_scales)
        tensors[f"{name}.weight"] = pack_bitnet_weight(layer.codes())
        tensors[f"{name}.weight_scale"] = inverse_scale(scale)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().contiguous()
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            raise HfBitnetExportError(f"layer {name!r} is the int8 head; export from a model packed with head='float'")
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in packed or "rotary_emb" in key:
            continue
        tensors[key] = value.detach().float().contiguous()
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # transformers ties it back to the embedding
    lossy = {n: s for n, s in spread.items() if s > 0}
    if lossy:
        worst = max(lossy, key=lossy.get)
        warnings.warn(
            f"export_hf_bitnet(lossy_scales=True): {len(lossy)} layers written with one mean scale; their scales "
            f"differed from it by up to {lossy[worst]:.1%} ({worst})",
            BitcompileWarning,
            stacklevel=2,
        )
    float_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out_config = copy.deepcopy(config)
    out_config.quantization_config = {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
        "modules_to_not_convert": float_linears, "use_rms_norm": False,
    }  # fmt: skip
    out_config.dtype = torch.float32
    folder.mkdir(parents=True, exist_ok=True)
    out_config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
