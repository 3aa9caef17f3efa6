"""``export_genai``: a packed ternary causal LM → a folder onnxruntime-genai loads and generates from.

The folder holds what ``onnxruntime_genai.Model(folder)`` reads:

* ``model.onnx``: one decoder step with a KV cache (:class:`~bitcompile.export.kv_cache.LlamaWithKVCache`):
  inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``;
  outputs ``logits``, ``present.{i}.key/value``; batch and sequence axes dynamic. The
  ternary layers are ``com.microsoft::MatMulNBits`` ``bits=2`` exactly as in
  :func:`~bitcompile.export.onnx.export_onnx`; an int8 head (``pack(head="int8")``) is
  ``MatMulInteger`` and its tied embedding a ``Gather`` of the same int8 codes.
* ``genai_config.json``: the decoder's input / output names and shapes, special tokens and
  greedy search defaults, in the layout of onnxruntime-genai's model builder
  (``past_present_share_buffer`` false: the graph appends to the cache it is given).
* the tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` ...) when a tokenizer is
  given; without one, generation from token ids still works and a warning says so.

Numerics: the same as ``export_onnx`` (docs/onnx.md, "Numerics"): the per-token int8
activation step is exact, onnxruntime's per-block requantization moves each activation by at
most half a block step when K > block_size; attention and norms are fp32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcompile.config import BitcompileWarning, TernaryConfig
from bitcompile.export.kv_cache import LlamaWithKVCache, cache_input_names, cache_output_names
from bitcompile.export.onnx import DEFAULT_OPSET, drop_debug_metadata, quiet_exporter, save_and_check
from bitcompile.export.onnx_graph import rewrite_ternary_weights
from bitcompile.export.prepare import is_hf_model, prepare_model
from bitcompile.export.results import ExportedLayer, OnnxExportError

__all__ = ["GENAI_MODEL_FILE", "GenaiExportResult", "export_decoder_with_cache", "export_genai", "genai_config"]

GENAI_MODEL_FILE = "model.onnx"

#: Sizes of the tracing example; none may be 0 or 1, which torch.export would specialize.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 4


@dataclasses.dataclass
class GenaiExportResult:
    """What :func:`export_genai` wrote."""

    folder: Path
    layers: list[ExportedLayer]
    files: dict[str, int]  # file name → bytes
    tokenizer: bool
    packed_copy: bool

    @property
    def ternary_layers(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if layer.ternary]

    @property
    def model_bytes(self) -> int:
        """``model.onnx`` plus its external data file, if any."""
        return sum(size for name, size in self.files.items() if name.startswith(GENAI_MODEL_FILE))

    def summary(self) -> str:
        lines = [f"wrote {self.folder} for onnxruntime-genai ({self.model_bytes / 1e6:.1f} MB model)"]
        lines += [f"  {name}: {size / 1e6:.2f} MB" for name, size in sorted(self.files.items())]
        lines.append(f"ternary layers (MatMulNBits bits=2): {len(self.ternary_layers)}")
        for layer in self.layers:
            if not layer.ternary:
                lines.append(f"float layer: {layer.name} ({layer.reason})")
        if not self.tokenizer:
            lines.append("no tokenizer files: og.Tokenizer will not load; generate from token ids")
        return "\n".join(lines)


def _trace_inputs(decoder: LlamaWithKVCache) -> tuple[tuple[Any, ...], dict[str, Any]]:
    batch, seq, past = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    Dim = torch.export.Dim
    batch_dim, seq_dim, past_dim = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    dtype = next((p.dtype for p in decoder.model.norm.parameters()), torch.float32)
    cache = [torch.randn(batch, decoder.num_kv_heads, past, decoder.head_dim, dtype=dtype) for _ in range(2 * decoder.num_layers)]
    inputs = (
        torch.randint(0, 2, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        cache,
    )
    shapes = {
        "input_ids": {0: batch_dim, 1: seq_dim},
        "attention_mask": {0: batch_dim, 1: Dim.AUTO},  # = past + sequence: export derives it
        "position_ids": {0: batch_dim, 1: seq_dim},
        "past_key_values": [{0: batch_dim, 2: past_dim} for _ in cache],
    }
    return inputs, shapes


def export_decoder_with_cache(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None) -> list[ExportedLayer]:
    """Export a transformers Llama causal LM *as it is* (packed or float) as one KV-cache step.

    ``model.onnx`` of :func:`export_genai` is this file; called on a float model it gives the
    fp32 baseline with the same inputs and outputs. Returns the ternary layers written.
    """
    from bitcompile.export.translations import translation_table

    decoder = LlamaWithKVCache(model)
    inputs, shapes = _trace_inputs(decoder)
    path = Path(path)
    opset = DEFAULT_OPSET["matmulnbits"] if opset is None else opset
    modes = [(m, m.training) for m in decoder.modules()]
    decoder.eval()
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                decoder, inputs, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                custom_translation_table=translation_table("matmulnbits"), verbose=False, optimize=True,
            )  # fmt: skip
    except Exception as error:
        root = error
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        first = next((line for line in str(root).splitlines() if line.strip()), type(root).__name__)
        raise OnnxExportError(f"export_genai: the exporter could not translate the KV-cache decoder: {first}") from error
    finally:
        for module, training in modes:
            module.training = training
    graph = program.model.graph
    names = ["input_ids", "attention_mask", "position_ids", *cache_input_names(decoder.num_layers)]
    if len(graph.inputs) != len(names) or len(graph.outputs) != 1 + 2 * decoder.num_layers:
        raise OnnxExportError(
            f"export_genai: the exported graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, "
            f"expected {len(names)} / {1 + 2 * decoder.num_layers}"
        )
    for value, name in zip(graph.inputs, names):
        value.name = name
    for value, name in zip(graph.outputs, ["logits", *cache_output_names(decoder.num_layers)]):
        value.name = name
    _name_total_length(program.model, graph.inputs[1])
    layers = rewrite_ternary_weights(program.model, "matmulnbits")
    drop_debug_metadata(program.model)
    save_and_check(program.model, path, caller="export_genai")
    return layers


def _name_total_length(model, attention_mask) -> None:
    """Call ``past + sequence`` (the mask's length, the presents' length) ``total_sequence_length``
    everywhere, as onnxruntime-genai's own models do (the exporter writes ``s53`` or the sum)."""
    import onnx_ir as ir

    total = {"past_sequence_length + sequence_length", "sequence_length + past_sequence_length"}
    mask_dim = attention_mask.shape[1] if attention_mask.shape is not None else None
    if isinstance(mask_dim, ir.SymbolicDim) and mask_dim.value:
        total.add(mask_dim.value)
    graph = model.graph
    for value in [*graph.inputs, *graph.outputs, *(out for node in graph.all_nodes() for out in node.outputs)]:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in total for d in value.shape):
            value.shape = ir.Shape(
                [ir.SymbolicDim("total_sequence_length") if isinstance(d, ir.SymbolicDim) and d.value in total else d for d in value.shape]
            )


def genai_config(model: nn.Module, context_length: int | None = None) -> dict[str, Any]:
    """``genai_config.json`` for :func:`export_decoder_with_cache`'s graph (onnxruntime-genai's model-builder layout)."""
    config = model.config
    num_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = config.eos_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.eos_token_id is not None:
        eos = generation.eos_token_id
    if eos is None or eos == []:
        raise OnnxExportError(
            "export_genai: the model has no eos_token_id (config or generation_config); onnxruntime-genai needs one "
            "to stop generating: set model.config.eos_token_id"
        )
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    context = int(context_length or config.max_position_embeddings)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GENAI_MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": num_layers,
                "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },  # fmt: skip
    }


def _check_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise OnnxExportError(f"export_genai: {str(folder)!r} is a file; give a folder to write model.onnx and genai_config.json into")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"export_genai: folder {str(folder)!r} is not empty; pass overwrite=True (CLI: --overwrite) to replace its files")
    parent = folder.parent if str(folder.parent) else Path(".")
    if not folder.exists() and not parent.is_dir():
        raise OnnxExportError(f"export_genai: cannot create {str(folder)!r}: folder {str(parent)!r} does not exist")


def _save_tokenizer(tokenizer: Any, folder: Path) -> bool:
    if tokenizer is None:
        warnings.warn(
            "export_genai: no tokenizer given, so the folder has no tokenizer files: og.Tokenizer(model) will fail; "
            "generate from token ids, or pass tokenizer= (a transformers tokenizer or its folder)",
            BitcompileWarning,
            stacklevel=3,
        )
        return False
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"export_genai: tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
    tokenizer.save_pretrained(str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise OnnxExportError(
            "export_genai: the tokenizer wrote no tokenizer.json (a slow tokenizer?); onnxruntime-genai needs a fast one"
        )
    return True


def export_genai(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
    config: TernaryConfig | None = None,
    context_length: int | None = None,
    overwrite: bool = False,
) -> GenaiExportResult:
    """Write ``folder`` for ``onnxruntime_genai.Model(folder)``: KV-cache ``model.onnx``, ``genai_config.json``, tokenizer.

    Args:
        model: a transformers ``LlamaForCausalLM``, packed (``bitcompile.pack``, optionally
            ``head="int8"``) or not (a *copy* is packed with ``config``; ``model`` is not changed).
        folder: the folder to write (created if missing; its parent must exist).
        tokenizer: a transformers (fast) tokenizer or a folder holding one; its files go into
            ``folder``. Without one, a :class:`BitcompileWarning` says generation needs token ids.
        config: how to pack an unpacked model (default :class:`~bitcompile.TernaryConfig`).
        context_length: ``max_length`` limit written to ``genai_config.json`` (default:
            ``config.max_position_embeddings``).
        overwrite: replace the files of a non-empty ``folder``.
    """
    if not isinstance(model, nn.Module) or not is_hf_model(model):
        raise TypeError(f"export_genai: model must be a transformers causal LM (PreTrainedModel), got {type(model).__name__}")
    folder = Path(folder)
    _check_folder(folder, overwrite)
    LlamaWithKVCache(model)  # the architecture check, before packing
    genai_config(model, context_length)  # the special tokens, before packing
    prepared, packed_copy, fallback = prepare_model(model, config)
    folder.mkdir(exist_ok=True)
    for stale in (GENAI_MODEL_FILE, GENAI_MODEL_FILE + ".data"):
        (folder / stale).unlink(missing_ok=True)
    layers = export_decoder_with_cache(prepared, folder / GENAI_MODEL_FILE)
    for name, reason in fallback.items():
        module = prepared.get_submodule(name)
        layers.append(ExportedLayer(name, module.weight.shape[1], module.weight.shape[0], "float", reason))
    ternary = {layer.name for layer in layers}
    for decision in getattr(prepared, "bitcompile_pack_plan", None) or []:
        if not decision.packed and decision.name not in ternary:
            layers.append(ExportedLayer(decision.name, decision.in_features, decision.out_features, "float", decision.reason))
    with open(folder / "genai_config.json", "w") as file:
        json.dump(genai_config(prepared, context_length), file, indent=4)
    has_tokenizer = _save_tokenizer(tokenizer, folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return GenaiExportResult(folder=folder, layers=layers, files=files, tokenizer=has_tokenizer, packed_copy=packed_copy)
