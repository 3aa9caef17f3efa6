"""``export_gguf``: a packed ternary Llama as a GGUF file that llama.cpp runs (issue 17).

Which ggml type each packed layer gets (all exact for the codes; GGUF stores every block
scale ``d`` as fp16, so the scale is rounded once to fp16 — the result reports the largest
relative rounding):

- per-row / per-tensor scales (or groups that are multiples of 256), ``K % 256 == 0``:
  ``TQ2_0`` (2.06 bits per weight) or, with ``ternary="tq1_0"``, ``TQ1_0`` (1.69 bits);
  each 256-block repeats its row's (group's) scale.
- otherwise, ``K % 32 == 0`` and the groups a multiple of 32: ``Q4_0`` (4.5 bits; nibbles
  7/8/9 are exactly ``-d, 0, +d``), or ``Q8_0`` (8.5 bits) with ``fallback="q8_0"``.
- otherwise ``F16`` (the values ``±fp16(s)``, 16 bits): exact too, but llama.cpp then
  multiplies with float activations instead of int8 ones.

Layers that stay float (the tied embedding / head, norms) are written as ``F32`` (norms
always; the rest ``float_type="f16"`` halves them). Metadata and the tokenizer follow
llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM`` with a byte-level BPE
("gpt2") tokenizer; ``bitcompile.*`` keys record what :mod:`bitcompile.runtime.gguf_ternary`
needs to import the file losslessly.

Activations (the documented difference to the packed torch model): llama.cpp quantizes the
activations of a TQ1_0 / TQ2_0 matmul to ``q8_K`` (int8 with one scale per 256-block of K) and
those of Q4_0 / Q8_0 to ``q8_0`` (one scale per 32-block), where bitcompile uses one scale per
token (DESIGN.md §3). The finer blocks differ by at most half an int8 step per element:
``|Δx| <= max|x_block| / 254`` against ``<= max|x_row| / 254``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bitcompile.config import BitcompileWarning
from bitcompile.kernels.groups import ScaleGroups
from bitcompile.runtime.gguf_blocks import BLOCK, encode
from bitcompile.runtime.gguf_llama import ARCH, GgufFormatError, gguf_name, metadata_from_config, rope_permutation
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.layers import PackedTernaryLinear

__all__ = ["GgufExportResult", "GgufTensor", "export_gguf"]

#: Format version of the ``bitcompile.*`` keys.
GGUF_METADATA_VERSION = 1


@dataclasses.dataclass
class GgufTensor:
    """One tensor written: its GGUF name, shape ``(out, in)``, ggml type, bytes, and why that type."""

    name: str
    shape: tuple[int, ...]
    encoding: str
    nbytes: int
    note: str


@dataclasses.dataclass
class GgufExportResult:
    """What :func:`export_gguf` wrote."""

    path: Path
    tensors: list[GgufTensor]
    max_scale_rounding: float  # largest |fp16(s) - s| / s over the ternary layers

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def bytes_by_encoding(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.encoding] = out.get(t.encoding, 0) + t.nbytes
        return out

    def summary(self) -> str:
        """The table of tensors (name, shape, encoding, bytes, note) and the totals, as text."""
        lines = [f"{'tensor':<28} {'shape':>14} {'type':>6} {'bytes':>12}  note"]
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            lines.append(f"{t.name:<28} {shape:>14} {t.encoding:>6} {t.nbytes:>12,}  {t.note}")
        totals = ", ".join(f"{k} {v:,} B" for k, v in sorted(self.bytes_by_encoding().items()))
        lines.append(f"file {self.path}: {self.file_bytes:,} bytes ({totals})")
        lines.append(f"scales stored as fp16: largest relative rounding {self.max_scale_rounding:.2e}")
        return "\n".join(lines)


def _ternary_encoding(layer: PackedTernaryLinear, ternary: str, fallback: str) -> tuple[str, str]:
    """The ggml type for a packed layer and the reason, from its K and scale groups."""
    k, code = layer.in_features, layer.group_code
    groups = ScaleGroups.from_code(code).label
    if k % 256 == 0 and (code <= 0 or code % 256 == 0):
        return ternary, f"ternary, {groups} scales"
    if k % 32 == 0 and (code <= 0 or code % 32 == 0):
        why = f"K={k} not a multiple of 256" if k % 256 else f"{groups} scales finer than a 256-block"
        return fallback, f"ternary as {fallback} (d = s): {why}"
    return "F16", f"ternary as F16 values ±fp16(s): K={k} or {groups} not a multiple of 32"


def _block_scales(layer: PackedTernaryLinear, block: int) -> torch.Tensor:
    """Scale of each ``block``-wide K block, ``(N, K // block)`` fp32 (each block lies in one group)."""
    scales, code, k = layer.scales.float(), layer.group_code, layer.in_features
    group_of_block = torch.zeros(k // block, dtype=torch.long) if code <= 0 else torch.arange(0, k, block) // code
    return scales[:, group_of_block]


def _check_fp16(name: str, scales: torch.Tensor) -> float:
    half = scales.half().float()
    if not torch.isfinite(half).all() or bool((half == 0).any()):
        raise GgufFormatError(
            f"layer {name!r}: a scale ({scales.min().item():.3g}..{scales.max().item():.3g}) does not fit fp16, "
            "which GGUF block scales use"
        )
    return float(((half - scales).abs() / scales).max()) if scales.numel() else 0.0


def _float_array(tensor: torch.Tensor, float_type: str) -> np.ndarray:
    t = tensor.detach().float().cpu()
    return (t.half() if float_type == "f16" else t).numpy()


def _tokenizer_folder(tokenizer: Any, scratch: str) -> tuple[Any, Path]:
    """The tokenizer object and a folder holding its ``tokenizer.json`` (saved there if needed)."""
    from transformers import AutoTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(os.fspath(tokenizer))
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder
    tokenizer.save_pretrained(scratch)
    return tokenizer, Path(scratch)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, tokenizer_pre: str | None) -> None:
    """Byte-level BPE vocabulary, merges and special ids, as convert_hf_to_gguf's ``_set_vocab_gpt2``."""
    import gguf
    import json

    with tempfile.TemporaryDirectory() as scratch:
        tok, folder = _tokenizer_folder(tokenizer, scratch)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) if (folder / "tokenizer.json").is_file() else {}
        model = spec.get("model", {})
        if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise GgufFormatError(
                "export_gguf writes byte-level BPE (gpt2-style) tokenizers only; this tokenizer's tokenizer.json has "
                f"model {model.get('type')!r}, decoder {(spec.get('decoder') or {}).get('type')!r}"
            )
        reverse = {i: t for t, i in tok.get_vocab().items()}
        if len(reverse) > vocab_size:
            raise GgufFormatError(f"the tokenizer has {len(reverse)} tokens but the model's vocab_size is {vocab_size}")
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        if tokenizer_pre is None:
            warnings.warn(
                "export_gguf: tokenizer_pre not given; llama.cpp will use its 'default' pre-tokenizer regex, so its text "
                "tokenization may differ from transformers' (token ids given directly are unaffected). Pass the "
                "llama.cpp name, e.g. tokenizer_pre='smollm' for SmolLM2",
                BitcompileWarning,
                stacklevel=4,
            )
        writer.add_tokenizer_pre(tokenizer_pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _check_exportable(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        kind = getattr(config, "model_type", type(model).__name__)
        raise GgufFormatError(f"export_gguf writes Llama models (LlamaForCausalLM); got {kind!r}")
    packed = [n for n, m in model.named_modules() if isinstance(m, PackedTernaryLinear)]
    if not packed:
        raise GgufFormatError("export_gguf: the model has no PackedTernaryLinear layer; run bitcompile.pack(model) first")
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            raise GgufFormatError(f"layer {name!r} is the int8 head; export GGUF from a model packed with head='float'")
    return config


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    tokenizer_pre: str | None = None,
    ternary: Literal["tq2_0", "tq1_0"] = "tq2_0",
    fallback: Literal["q4_0", "q8_0"] = "q4_0",
    float_type: Literal["f32", "f16"] = "f32",
    overwrite: bool = False,
) -> GgufExportResult:
    """Write a packed ternary ``LlamaForCausalLM`` as GGUF for llama.cpp.

    Args:
        model: a model returned by :func:`bitcompile.pack` (a transformers Llama).
        path: the ``.gguf`` file to write.
        tokenizer: a transformers byte-level BPE tokenizer, or a folder with ``tokenizer.json``.
        tokenizer_pre: llama.cpp's pre-tokenizer name (``"smollm"`` for SmolLM2); ``None``
            writes ``"default"`` with a BitcompileWarning.
        ternary: ggml type of the layers with K a multiple of 256.
        fallback: ggml type of the other ternary layers (K a multiple of 32).
        float_type: type of the float embedding / head (norms are always F32).
        overwrite: replace ``path`` if it exists.

    Returns:
        :class:`GgufExportResult`: every tensor's encoding and bytes (``.summary()`` prints the table).
    """
    import gguf

    if ternary not in ("tq2_0", "tq1_0") or fallback not in ("q4_0", "q8_0") or float_type not in ("f32", "f16"):
        raise ValueError(
            f"export_gguf: ternary={ternary!r} (tq2_0, tq1_0), fallback={fallback!r} (q4_0, q8_0), "
            f"float_type={float_type!r} (f32, f16): one is not allowed"
        )
    path = Path(os.fspath(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"export_gguf: {str(path)!r} exists; pass overwrite=True to replace it")
    config = _check_exportable(model)
    if tokenizer is None:
        source = Path(str(getattr(config, "_name_or_path", "") or ""))
        if not (source / "tokenizer.json").is_file():
            raise ValueError("export_gguf: pass tokenizer= (a transformers tokenizer or its folder); GGUF files carry one")
        tokenizer = source
    meta = metadata_from_config(config)
    tensors: list[tuple[str, np.ndarray, Any, GgufTensor]] = []
    ternary_names: list[str] = []
    groups: list[str] = []
    activation_modes = set()
    worst = 0.0
    covered: set[str] = set()
    for module_name, module in model.named_modules():
        base = gguf_name(module_name)
        if base is None:
            continue
        covered.update(f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False))
        covered.update(f"{module_name}.{n}" for n, _ in module.named_buffers(recurse=False))
        perm = rope_permutation(module_name, getattr(module, "out_features", 0), config) if base.endswith(("attn_q", "attn_k")) else None
        if isinstance(module, PackedTernaryLinear):
            kind, note = _ternary_encoding(module, ternary.upper(), fallback.upper())
            codes, scale = module.codes(), module.scales.float()
            if perm is not None:
                codes, scale = codes[perm], scale[perm]
            activation_modes.add(module.quantize_activations)
            view = PackedTernaryLinear.from_codes(codes, scale, None, _config_of(module), torch.float32)
            worst = max(worst, _check_fp16(module_name, scale))
            if kind == "F16":
                data, qtype = (codes.float() * _expand(view)).half().numpy(), None
            else:
                block = BLOCK[kind]
                data = encode(codes.numpy(), _block_scales(view, block).half().numpy(), kind)
                qtype = getattr(gguf.GGMLQuantizationType, kind)
            shape = (module.out_features, module.in_features)
            tensors.append((f"{base}.weight", data, qtype, GgufTensor(f"{base}.weight", shape, kind, data.nbytes, note)))
            ternary_names.append(f"{base}.weight")
            groups.append(str(ScaleGroups.from_code(module.group_code).option))
            if module.bias is not None:
                bias = module.bias.detach().float()
                bias = bias[perm] if perm is not None else bias
                tensors.append((f"{base}.bias", bias.numpy(), None, GgufTensor(f"{base}.bias", tuple(bias.shape), "F32", bias.numel() * 4, "bias")))
            continue
        for pname, param in module.named_parameters(recurse=False):
            value = param.detach().float()
            if perm is not None:
                value = value[perm]
            is_norm = value.dim() == 1
            data = _float_array(value, "f32" if is_norm else float_type)
            kind = "F32" if data.dtype == np.float32 else "F16"
            note = "norm" if pname == "weight" and is_norm else f"kept float ({type(module).__name__})"
            tensors.append((f"{base}.{pname}", data, None, GgufTensor(f"{base}.{pname}", tuple(value.shape), kind, data.nbytes, note)))
    missed = [n for n, _ in model.named_parameters() if n not in covered]
    missed += [n for n, b in model.named_buffers() if n not in covered and b is not None and "rotary_emb" not in n]
    tied = getattr(config, "tie_word_embeddings", False)
    missed = [n for n in missed if not (tied and n == "lm_head.weight")]
    if missed:
        raise GgufFormatError(f"export_gguf: no GGUF tensor for {', '.join(missed[:4])}{' ...' if len(missed) > 4 else ''}")
    names = [t[0] for t in tensors]
    if tied and "output.weight" in names:  # the tied head is the embedding: llama.cpp reuses token_embd
        index = names.index("output.weight")
        tensors.pop(index)

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(type(model).__name__)
    writer.add_context_length(meta["context_length"])
    writer.add_embedding_length(meta["embedding_length"])
    writer.add_block_count(meta["block_count"])
    writer.add_feed_forward_length(meta["feed_forward_length"])
    writer.add_head_count(meta["head_count"])
    writer.add_head_count_kv(meta["head_count_kv"])
    writer.add_rope_dimension_count(meta["rope_dimension_count"])
    writer.add_key_length(meta["key_length"])
    writer.add_value_length(meta["value_length"])
    writer.add_layer_norm_rms_eps(meta["rms_eps"])
    writer.add_rope_freq_base(meta["rope_freq_base"])
    writer.add_vocab_size(meta["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ1_0 if ternary == "tq1_0" else gguf.LlamaFileType.MOSTLY_TQ2_0)
    writer.add_uint32("bitcompile.format_version", GGUF_METADATA_VERSION)
    writer.add_string("bitcompile.activations", "int8" if activation_modes != {False} else "none")
    writer.add_array("bitcompile.ternary_tensors", ternary_names)
    writer.add_array("bitcompile.group_sizes", groups)
    _add_tokenizer(writer, tokenizer, meta["vocab_size"], tokenizer_pre)
    for name, data, qtype, _ in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufExportResult(path, [t[3] for t in tensors], worst)


def _config_of(layer: PackedTernaryLinear) -> Any:
    from bitcompile.config import TernaryConfig

    return TernaryConfig(group_size=layer.group_size, activations=layer.activations, target="reference")


def _expand(layer: PackedTernaryLinear) -> torch.Tensor:
    from bitcompile.kernels.groups import expand_scales

    return expand_scales(layer.scales.half().float(), layer.in_features, layer.group_code)
