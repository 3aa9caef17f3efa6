"""``pack``: from a trained model to 2-bit weights, and the plan behind it.

``pack(model)`` swaps every ``nn.Linear`` the shared layer policy approves for a
:class:`~bitcompile.runtime.layers.PackedTernaryLinear` that holds only 2-bit codes, fp32
scales and the bias; the float weight is dropped with the old module (memory is released
once nothing else, such as an optimizer, still references it). All packed layers are built
before the first swap, so an error leaves the user's model exactly as it was.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bitcompile.config import BitcompileWarning, TernaryConfig, as_config
from bitcompile.kernels import cpu as cpu_kernels
from bitcompile.targets import get_kernel, resolve_target
from bitcompile.policy import layer_skip_reason, unmatched_patterns
from bitcompile.runtime.experts import EXPERT_WEIGHTS, PackedTernaryExperts, expert_modules, experts_skip_reason
from bitcompile.runtime.follow_compiler import follow_compiler
from bitcompile.runtime.gguf_checkpoint import is_gguf_path, load_gguf_model
from bitcompile.runtime.hf_folder import ModelLoadError, load_hf_folder
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear
from bitcompile.runtime.layers import FloatGemvLinear, PackedTernaryLinear, check_layout, float_gemv_refusal
from bitcompile.runtime.module_tree import linear_view, parameter_names, replace_submodule
from bitcompile.runtime.prequantized import detect_ternary

__all__ = ["PackDecision", "PreQuantized", "pack", "plan_packing"]

PreQuantized = Literal["auto"] | bool


@dataclasses.dataclass
class PackDecision:
    """What ``pack`` does with one ``nn.Linear``."""

    name: str
    out_features: int
    in_features: int
    packed: bool
    reason: str
    source: str = ""  # "quantized" (absmean quantizer) or "already ternary" (lossless)
    layout: str = ""  # packed layers: "2bit" or "1.6bit" (pack's layout=)
    packed_bytes: int = 0  # packed layers: bytes of the packed weight (codes only; scales and bias apart)


def _check_not_packed(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, PackedTernaryLinear):
            raise ValueError(
                f"model is already packed: {name or 'the model'} is a PackedTernaryLinear; pack a model only once"
            )


def plan_packing(
    model: nn.Module,
    config: TernaryConfig | Mapping[str, Any] | None = None,
    example_inputs: Sequence[Any] | None = None,
) -> list[PackDecision]:
    """Which linear layers (``nn.Linear``, ``Conv1D``) :func:`pack` would pack, and why the others stay float.

    Without ``example_inputs`` the plan comes from the module tree and the shared policy
    (names, sizes, ties, subclasses that override ``forward``). What only the forward shows
    (a layer called twice, its weight read elsewhere) needs ``example_inputs``: the model then
    runs once through the compiler's own capture and discovery, and a layer is packed only if
    the compiler makes every call of it ternary (:mod:`bitcompile.runtime.follow_compiler`).
    """
    config = as_config(config, "plan_packing")
    shared = parameter_names(model)
    plan = []
    for name, module in model.named_modules():
        if (view := linear_view(module)) is None:
            continue
        others = [n for n in shared.get(id(view.parameter), []) if n != f"{name}.weight"]
        shared_with = f"{', '.join(others)} (tied)" if others else None
        reason = layer_skip_reason(
            name, view.weight, view.out_features, view.in_features, config, shared_with, type(module)
        )
        plan.append(PackDecision(name, view.out_features, view.in_features, reason is None, reason or "packed"))
    if example_inputs is not None:
        follow_compiler(model, plan, config, example_inputs, shared)
    return plan + _plan_experts(model, config)


def _plan_experts(model: nn.Module, config: TernaryConfig) -> list[PackDecision]:
    """One row per 3-D expert weight (``<experts>.gate_up_proj``: one expert's out x in); both or neither pack."""
    rows = []
    for name, module in expert_modules(model):
        reason = experts_skip_reason(name, module, config)
        for weight_name in EXPERT_WEIGHTS:
            e, a, b = module._parameters[weight_name].shape
            out_in = (b, a) if getattr(module, "is_transposed", False) else (a, b)
            what = f"{e} experts, 2-bit per expert" if reason is None else f"{e} experts: {reason}"
            rows.append(PackDecision(f"{name}.{weight_name}", *out_in, reason is None, "packed" if reason is None else what,
                                     "quantized" if reason is None else ""))  # fmt: skip
    return rows


def _ternary_codes(name: str, weight: Tensor, config: TernaryConfig, pre_quantized: PreQuantized):
    detected = detect_ternary(weight, config.group_code) if pre_quantized in ("auto", True) else None
    if detected is not None:
        return (*detected, "already ternary")
    if pre_quantized is True:
        raise ValueError(
            f"layer {name!r}: pre_quantized=True but its weight is not ternary with {config.group_size.label} "
            "scales (some group has more than one non-zero magnitude); pass the checkpoint's group_size or "
            "pre_quantized='auto'"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r}: weight has NaN or inf values; refusing to pack it")
    codes, scales = get_kernel("reference").quantize_weight(weight, config.group_code)
    return codes, scales, "quantized"


def pack(
    model: nn.Module | str | os.PathLike,
    config: TernaryConfig | Mapping[str, Any] | None = None,
    *,
    pre_quantized: PreQuantized = "auto",
    float_gemv: bool = True,
    head: Literal["float", "int8"] = "float",
    example_inputs: Sequence[Any] | None = None,
    layout: Literal["2bit", "1.6bit"] = "2bit",
) -> nn.Module:
    """Replace approved linear layers of ``model`` (in place) by :class:`PackedTernaryLinear`.

    Linear layers are ``nn.Linear`` and GPT-2 style ``Conv1D`` modules (the layers the
    compiler rewrites through ``F.linear`` or ``addmm``).

    Args:
        model: a trained (or pseudo-quantized) float model, or the path of a local Hugging
            Face model folder (config.json + safetensors; needs ``transformers``, never downloads),
            a ``.gguf`` file, or an HF BitNet folder. A ternary checkpoint made elsewhere is read
            losslessly and returned packed: a ``.gguf`` file with TQ1_0 / TQ2_0 tensors
            (:mod:`bitcompile.runtime.gguf_ternary`) or an HF BitNet folder
            (:mod:`bitcompile.runtime.hf_bitnet`); for those, the file decides the layers and their
            scale groups and ``config`` gives ``target`` only. A ``.gguf`` file without ternary
            tensors is dequantized to float32 by transformers' GGUF reader (needs ``gguf`` and
            ``accelerate``) and packed like a float model.
        config: the same :class:`TernaryConfig` the model was trained with (group size,
            activation mode, exclude/include, min_features, target), or the same options as a
            dict (``{"group_size": 128}``, what ``torch.compile(..., options=...)`` took).
        pre_quantized: ``"auto"`` packs weights that are already ternary losslessly and
            quantizes the others; ``True`` requires every packed layer to be already ternary;
            ``False`` always applies the absmean quantizer.
        float_gemv: serve the plain fp32 ``nn.Linear`` layers that stay float (e.g. a tied
            ``lm_head``) with bitcompile's multi-threaded GEMV at decode sizes
            (:class:`FloatGemvLinear`; the CPU target only). ``False`` leaves them untouched.
        head: ``"int8"`` stores the output head (``get_output_embeddings()`` or ``lm_head``)
            as per-row int8 and runs it W8A8 (:mod:`bitcompile.runtime.int8_head`); an
            embedding tied to it reads its rows from the same codes. ``"float"`` keeps it.
        example_inputs: inputs the model was trained on (a tuple, as for ``explain``). With
            them ``pack`` runs the compiler's capture once and packs exactly the layers the
            compiler makes ternary, including what only the forward shows (a layer called twice,
            a weight read elsewhere: kept float). Without them the plan comes from the module
            tree, which cannot see those cases (:func:`plan_packing`). Like ``explain``, the
            capture resets Dynamo's caches (compiled models recompile on their next call).
        layout: how the ternary codes are stored: ``"2bit"`` (the canonical layout, four
            weights per byte) or ``"1.6bit"`` (five weights per byte, 20 % fewer bytes;
            :mod:`bitcompile.kernels.packing_base3`). Outputs are identical; the 1.6-bit layers
            have their own CPU kernels in eager calls (AVX-512 VBMI + GFNI for per-row /
            per-tensor W1.58A8, else a portable C kernel) and use a per-call 2-bit copy under
            ``torch.compile``, autograd and other targets; ONNX export writes them as 2-bit.

    Returns:
        ``model`` itself; ``model.bitcompile_pack_plan`` lists every decision. The freed float
        weights' memory is handed back to the OS (glibc).
    """
    check_layout("pack", layout)
    model = _pack(model, config, pre_quantized, float_gemv, head, example_inputs, layout)
    _return_freed_memory()  # after _pack's frame, which referenced the float weights, is gone
    return model


def _check_pack_arguments(pre_quantized: Any, float_gemv: Any, head: Any) -> None:
    # `is`, not `in`: 1 == True and "yes" must not quietly mean False
    if not (pre_quantized is True or pre_quantized is False or (isinstance(pre_quantized, str) and pre_quantized == "auto")):
        raise ValueError(f"pack: pre_quantized={pre_quantized!r} is invalid: expected 'auto', True or False")
    if not isinstance(float_gemv, bool):
        raise ValueError(f"pack: float_gemv={float_gemv!r} is invalid: expected True or False")
    if not (isinstance(head, str) and head in ("float", "int8")):
        raise ValueError(f"pack: head={head!r} is not one of 'float', 'int8'")


def _pack(
    model, config, pre_quantized: PreQuantized, float_gemv: bool, head: str, example_inputs: Sequence[Any] | None,
    layout: str = "2bit",
) -> nn.Module:
    config = as_config(config, "pack")
    _check_pack_arguments(pre_quantized, float_gemv, head)
    if not isinstance(model, nn.Module):
        model = _load_path(model, config)
        if hasattr(model, "bitcompile_import_sources"):  # a ternary checkpoint: already packed, losslessly
            return _finish_import(model, config, float_gemv, head)
    _check_not_packed(model)
    plan = plan_packing(model, config, example_inputs)
    _warn_nothing_packed_or_unmatched(plan, config)
    int8_modules = _int8_head_replacements(model, plan) if head == "int8" else {}
    replacements: dict[str, nn.Module] = {}
    float_experts = dict(expert_modules(model))
    for decision in plan:
        if not decision.packed:
            continue
        experts, _, weight_name = decision.name.rpartition(".")
        if weight_name in EXPERT_WEIGHTS and experts in float_experts:
            if experts not in replacements:  # gate_up_proj and down_proj: one packed module
                replacements[experts] = PackedTernaryExperts.from_float(float_experts[experts], config)
            continue
        if not decision.name:
            raise ValueError("pack() replaces submodules: wrap a bare nn.Linear in a container (nn.Sequential)")
        view = linear_view(model.get_submodule(decision.name))
        codes, scales, decision.source = _ternary_codes(decision.name, view.weight, config, pre_quantized)
        replacements[decision.name] = PackedTernaryLinear.from_codes(
            codes, scales, view.bias, config, view.parameter.dtype, layout=layout
        ).to(view.parameter.device)
        decision.layout, decision.packed_bytes = layout, replacements[decision.name].packed.nbytes
    if layout == "1.6bit" and replacements:
        _warn_portable_base3(config)
    for name, packed in replacements.items():  # nothing above mutated the model; swapping cannot fail
        replace_submodule(model, name, packed)
    for name, module in int8_modules.items():
        replace_submodule(model, name, module)
    if float_gemv:
        _serve_float_layers(model, plan, config)
    model.bitcompile_pack_plan = plan
    return model


def _load_path(path: str | os.PathLike, config: TernaryConfig) -> nn.Module:
    """A model from a ``.gguf`` file (its ternary tensors, losslessly) or a Hugging Face folder."""
    folder = Path(os.fspath(path))
    if is_gguf_path(folder) and not folder.is_dir():
        return load_gguf_model(folder, target=config.target)  # ternary tensors losslessly, else float
    if folder.is_dir():
        from bitcompile.runtime.hf_bitnet import load_hf_bitnet

        bitnet = load_hf_bitnet(folder, target=config.target)  # None unless quant_method == "bitnet"
        if bitnet is not None:
            return bitnet
    if not folder.is_dir():
        what = "a file" if folder.exists() else "not an existing folder"
        raise ModelLoadError(
            f"pack: {str(folder)!r} is {what}; pass an nn.Module, a local Hugging Face model folder "
            "(config.json + *.safetensors) or a .gguf file"
        )
    model, _ = load_hf_folder(folder)
    return model


def _finish_import(model: nn.Module, config: TernaryConfig, float_gemv: bool, head: str) -> nn.Module:
    """The plan of an imported ternary checkpoint (its layers were packed by the loader), int8 head, GEMV."""
    sources = model.__dict__.pop("bitcompile_import_sources")
    plan = []
    for name, module in model.named_modules():
        if isinstance(module, PackedTernaryLinear):
            plan.append(PackDecision(name, module.out_features, module.in_features, True, "packed", sources.get(name, "")))
        elif (view := linear_view(module)) is not None:
            plan.append(PackDecision(name, view.out_features, view.in_features, False, "float in the checkpoint"))
    for name, module in (_int8_head_replacements(model, plan) if head == "int8" else {}).items():
        replace_submodule(model, name, module)
    if float_gemv:
        _serve_float_layers(model, plan, config)
    model.bitcompile_pack_plan = plan
    return model


def _warn_nothing_packed_or_unmatched(plan: list[PackDecision], config: TernaryConfig) -> None:
    """A typo in ``exclude`` / ``include`` must not silently pack nothing, or the wrong layers."""
    if plan and not any(d.packed for d in plan):
        reasons = "; ".join(f"{d.name}: {d.reason}" for d in plan[:3])
        warnings.warn(
            f"pack: none of the model's {len(plan)} linear layers is packed ({reasons}{'; ...' if len(plan) > 3 else ''})",
            BitcompileWarning,
            stacklevel=4,
        )
    for option, pattern in unmatched_patterns(config, [d.name for d in plan]):
        warnings.warn(
            f"pack: {option} pattern {pattern!r} matches none of the model's {len(plan)} linear layers "
            f"({', '.join(d.name for d in plan[:6])}{', ...' if len(plan) > 6 else ''}); check its spelling",
            BitcompileWarning,
            stacklevel=4,
        )


def _warn_portable_base3(config: TernaryConfig) -> None:
    """Say once when the 1.6-bit layers will run the portable C kernel (no SIMD one applies)."""
    from bitcompile.kernels.cpu.base3 import kernel_isa_base3

    if resolve_target(config.target) != "cpu" or not cpu_kernels.available():
        return
    isa = kernel_isa_base3(config.group_code, "int8" if config.quantize_activations else "none")
    if isa == "scalar":
        why = (
            f"its SIMD kernel needs AVX-512 VBMI; running {cpu_kernels.isa()}"
            if config.group_code <= 0 and config.quantize_activations
            else "its SIMD kernel covers W1.58A8 with per-row / per-tensor scales only"
        )
        warnings.warn(
            f"pack(layout='1.6bit'): the 1.6-bit layers will run the portable C kernel ({why}), several times "
            "slower than the 2-bit kernels; pack with layout='2bit' for speed",
            BitcompileWarning,
            stacklevel=4,
        )


def _return_freed_memory() -> None:
    """Hand the pages of the freed float weights back to the OS.

    Why: glibc keeps freed heap memory mapped, so without this the process stayed as large as
    before packing (SmolLM-135M: RSS 786 MiB after ``pack``, 484 MiB after ``malloc_trim``;
    24 x 4 MiB layers: +62 MiB without it, -82 MiB with it). Other C libraries: nothing to do.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (musl has no malloc_trim)
        pass


def _int8_head_replacements(model: nn.Module, plan: list[PackDecision]) -> dict[str, nn.Module]:
    """The int8 output head (and the embedding tied to it), built without touching ``model``."""
    getter = getattr(model, "get_output_embeddings", None)
    head_module = getter() if callable(getter) else getattr(model, "lm_head", None)
    names = {id(m): n for n, m in model.named_modules()}
    if not isinstance(head_module, nn.Linear) or id(head_module) not in names or not names[id(head_module)]:
        raise ValueError(
            "pack(head='int8'): the model has no nn.Linear output head (get_output_embeddings() or an "
            f"'lm_head' submodule); found {type(head_module).__name__}"
        )
    head_name = names[id(head_module)]
    decision = next(d for d in plan if d.name == head_name)
    if decision.packed:
        raise ValueError(
            f"pack(head='int8'): layer {head_name!r} would be packed ternary; keep it out of ternary "
            "(float_roles with 'head', the default, or exclude=[...]) to store it as int8"
        )
    if not torch.isfinite(head_module.weight).all():  # per-row absmax scales would be NaN / inf
        raise ValueError(f"pack(head='int8'): layer {head_name!r}: weight has NaN or inf values; refusing to pack it")
    head = Int8Linear.from_weight(head_module.weight, head_module.bias)
    replacements: dict[str, nn.Module] = {head_name: head}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.weight is head_module.weight:
            embedding = Int8Embedding.from_embedding(module)
            head.share_codes_with(embedding)
            replacements[name] = embedding
            decision.reason += f"; int8 (W8A8), tied to {name} (int8 rows)"
            break
    else:
        decision.reason += "; int8 (W8A8)"
    decision.source = "int8"
    device = head_module.weight.device
    return {name: module.to(device) for name, module in replacements.items()}


def _serve_float_layers(model: nn.Module, plan: list[PackDecision], config: TernaryConfig) -> None:
    """Route the fp32 CPU ``nn.Linear`` layers that stay float through :class:`FloatGemvLinear`."""
    if resolve_target(config.target) != "cpu" or not cpu_kernels.available():
        return
    modules = dict(model.named_modules())
    for decision in plan:
        module = modules.get(decision.name)  # None for a row of MoE expert weights (not a module)
        if not decision.packed and type(module) is nn.Linear and float_gemv_refusal(module) is None:
            module.__class__ = FloatGemvLinear
            decision.reason += "; kept fp32, served by bitcompile's fp32 GEMV for decode"
