"""Hugging Face BitNet checkpoints (``quantization_config.quant_method == "bitnet"``), read losslessly.

transformers' ``integrations/bitnet.py`` (``BitLinear``, what ``microsoft/bitnet-b1.58-2B-4T``
ships) stores each ternary layer as

- ``weight``: uint8 ``(ceil(N / 4), K)``: four codes ``c = q + 1`` per byte, packed along the
  *output* dimension: bits ``2i..2i+1`` of row ``r`` hold output row ``i * ceil(N/4) + r``;
- ``weight_scale``: one value per tensor, the *inverse* of bitcompile's scale:
  ``y = (q_x @ q_w^T) / (s_in * weight_scale)`` with ``s_in = 127 / max|x_row|``, so
  ``W = q_w / weight_scale`` and bitcompile's ``s = 1 / weight_scale`` (one fp32 division).

Activations: ``BitLinear`` quantizes per token to int8 with ``round(x * 127 / max|x|)``,
bitcompile with ``round(x / (max|x| / 127))`` (DESIGN.md §3): the same grid, the two
products may round differently by one fp32 ulp, so an element sitting exactly on a
half-step can land one int8 step apart.

Not read (one clear error each): ``linear_class="autobitlinear"`` (float weights with a
multiplier scale), ``use_rms_norm=True`` (a norm inside every linear layer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from bitcompile.config import TernaryConfig
from bitcompile.kernels.groups import ScaleGroups
from bitcompile.runtime.hf_folder import ModelLoadError, first_line
from bitcompile.runtime.layers import PackedTernaryLinear
from bitcompile.runtime.module_tree import replace_submodule

__all__ = ["is_hf_bitnet_folder", "load_hf_bitnet", "pack_bitnet_weight", "unpack_bitnet_weight"]

VALUES_PER_BYTE = 4


def pack_bitnet_weight(codes: Tensor) -> Tensor:
    """int8 codes ``(N, K)`` in {-1, 0, 1} → HF BitNet uint8 ``(ceil(N/4), K)`` (packed along N)."""
    n, k = codes.shape
    rows = -(-n // VALUES_PER_BYTE)
    c = torch.ones((rows * VALUES_PER_BYTE, k), dtype=torch.uint8)  # padding rows hold q = 0
    c[:n] = (codes.to(torch.int16) + 1).to(torch.uint8)
    planes = c.reshape(VALUES_PER_BYTE, rows, k)  # plane i = output rows i*rows .. (i+1)*rows-1
    return planes[0] | (planes[1] << 2) | (planes[2] << 4) | (planes[3] << 6)


def unpack_bitnet_weight(packed: Tensor, out_features: int) -> Tensor:
    """Inverse of :func:`pack_bitnet_weight`: int8 codes ``(out_features, K)``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] * VALUES_PER_BYTE < out_features:
        raise ValueError(f"expected a uint8 (ceil({out_features}/4), K) BitNet weight, got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(VALUES_PER_BYTE, 1, 1)
    c = ((packed.unsqueeze(0) >> shifts) & 3).reshape(-1, packed.shape[1])[:out_features]
    if c.numel() and int(c.max()) > 2:
        raise ValueError("found the 2-bit code 3, which is not a ternary value in HF BitNet's packing")
    return (c.to(torch.int8) - 1).contiguous()


def is_hf_bitnet_folder(folder: Path) -> bool:
    """Whether ``folder/config.json`` declares ``quantization_config.quant_method == "bitnet"``."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "bitnet"


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"folder {str(folder)!r} has no *.safetensors weights")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_hf_bitnet(folder: str | os.PathLike, *, target: str = "auto") -> nn.Module | None:
    """A packed transformers model from an HF BitNet folder, or ``None`` if it is not one.

    Each ``BitLinear`` (a ``weight`` with a ``weight_scale``) becomes a per-tensor
    :class:`PackedTernaryLinear` with the same codes and ``s = 1 / weight_scale``; everything
    else is loaded as float. ``bitcompile_import_sources`` names the packed layers.
    """
    import transformers

    folder = Path(os.fspath(folder))
    if not is_hf_bitnet_folder(folder):
        return None
    raw = json.loads((folder / "config.json").read_text())
    quant = raw["quantization_config"]
    if quant.get("linear_class", "bitlinear") != "bitlinear":
        raise ModelLoadError(f"{str(folder)!r}: linear_class={quant['linear_class']!r}; bitcompile reads 'bitlinear' checkpoints")
    if quant.get("use_rms_norm"):
        raise ModelLoadError(f"{str(folder)!r}: use_rms_norm=True (a norm inside each BitLinear) is not supported by bitcompile")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        config.quantization_config = None
        del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    except Exception as error:
        raise ModelLoadError(f"{str(folder)!r}: transformers could not build the model ({first_line(error)})") from error
    tensors = _read_tensors(folder)
    modules = dict(model.named_modules())
    layer_config = TernaryConfig(group_size=ScaleGroups.per_tensor(), activations="int8", target=target)
    sources: dict[str, str] = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_scale")):
        name = key[: -len(".weight_scale")]
        module = modules.get(name)
        if not isinstance(module, nn.Linear) or f"{name}.weight" not in tensors:
            raise ModelLoadError(f"{str(folder)!r}: {key} belongs to no linear layer with a packed weight")
        packed = tensors.pop(f"{name}.weight")
        inverse = tensors.pop(key).float().reshape(-1)
        if inverse.numel() != 1 or not bool(torch.isfinite(inverse).all()) or float(inverse) <= 0:
            raise ModelLoadError(f"{str(folder)!r}: {key} must be one positive finite value, got {inverse.tolist()[:4]}")
        if tuple(packed.shape) != (-(-module.out_features // VALUES_PER_BYTE), module.in_features):
            raise ModelLoadError(
                f"{str(folder)!r}: {name}.weight has shape {tuple(packed.shape)}, expected "
                f"{(-(-module.out_features // VALUES_PER_BYTE), module.in_features)} (packed along the output dim)"
            )
        codes = unpack_bitnet_weight(packed, module.out_features)
        scales = (1.0 / inverse).expand(module.out_features, 1).contiguous()
        bias = tensors.pop(f"{name}.bias", None)
        replace_submodule(model, name, PackedTernaryLinear.from_codes(codes, scales, bias, layer_config, torch.float32))
        sources[name] = "HF BitNet (lossless)"
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not k.endswith((".packed", ".scales")) and not (tied and k == "lm_head.weight")]
    missing = [k for k in missing if not (k.rpartition(".")[0] in sources and k.endswith(".bias"))]
    if missing or unexpected:
        raise ModelLoadError(f"{str(folder)!r}: missing tensors {missing[:4]}, unexpected tensors {unexpected[:4]}")
    if tied:
        model.tie_weights()
    model.bitcompile_import_sources = sources
    return model
