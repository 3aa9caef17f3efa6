"""The Ascend plan of one ternary layer: which torch_npu kernels, weight layout and activation path.

The chip is an explicit input (``TernaryConfig.chip``; ``"auto"`` asks
``torch_npu.npu.get_device_name()`` on an NPU and means ``"A2"`` on the CPU emulator), because
what the kernels accept differs (docs/cann.md "Chips"; sources: op-plugin
``docs/zh/custom_APIs/torch_npu/*.md``, ops-nn ``aclnnWeightQuantBatchMatmulV2.md``,
``quant_batch_matmul_v3_tiling.cpp``):

* Atlas A2 / A3: W1.58A8 with one weight scale column runs ``npu_dynamic_quant`` →
  ``npu_quant_matmul`` (int8 ``(K, N)``, FRACTAL_NZ on an NPU unless K or N is 1; no 65535
  limit for this input combination). Everything else runs ``npu_weight_quant_batchmatmul``
  (K, N <= 65535) on int4-packed weights where the layout allows, int8 otherwise; FRACTAL_NZ
  only in graph mode (torchair) and only where the NZ limits hold, ND otherwise.
* Atlas 310P: no ``npu_dynamic_quant``, no int4 packing, no per-token ``npu_quant_matmul``,
  fp16 activations only: every layer runs ``npu_weight_quant_batchmatmul`` on int8 ``(K, N)``
  ND weights in fp16; int8 activations are quantized with aten ops (bitcompile's reference
  quantizer) and dequantized before it.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from bitcompile.kernels.groups import PER_TENSOR, num_groups

CHIPS = ("A2", "A3", "310P")
CHIP_OPTIONS = ("auto", *CHIPS)
MAX_LAST_DIM = 65535  # npu_weight_quant_batchmatmul: K, N in [1, 65535]
MAX_DIM_INT32 = 2**31 - 1  # A2/A3 quant_batch_matmul_v3 tiling for int8 + 1-D fp32 scale + 1-D pertoken
NZ_GROUP_SIZES = (64, 128)
INT4_PER_INT32 = 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def chip_from_device_name(name: str) -> str:
    """``torch_npu.npu.get_device_name()`` → ``"A2"`` (Ascend910B*), ``"A3"`` (Ascend910_93*), ``"310P"``."""
    if name.startswith("Ascend910_93") or name.startswith("Ascend910C"):
        return "A3"
    if name.startswith("Ascend910B"):
        return "A2"
    if name.startswith("Ascend310P"):
        return "310P"
    raise ValueError(
        f"bitcpm target 'cann': Ascend device {name!r} is not one of the chips the plan knows "
        f"(Atlas A2 Ascend910B*, A3 Ascend910_93*, 310P Ascend310P*); pass options={{'chip': ...}}"
    )


def detect_chip() -> str | None:
    """The chip of ``npu:0`` through the real torch_npu, or None without one (never imports a broken torch_npu)."""
    from bitcompile.kernels.npu_ops import ensure_npu_ops

    if ensure_npu_ops() != "torch_npu" or importlib.util.find_spec("torch_npu") is None:
        return None
    import torch_npu  # noqa: F401  (already imported by ensure_npu_ops)

    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return None
    return chip_from_device_name(torch.npu.get_device_name())  # type: ignore[attr-defined]


def resolve_chip(option: str = "auto") -> str:
    """An explicit chip as given; ``"auto"``: the detected NPU's chip, ``"A2"`` on the CPU emulator."""
    if option not in CHIP_OPTIONS:
        raise ValueError(f"bitcpm target 'cann': chip={option!r} is not one of {CHIP_OPTIONS}")
    if option != "auto":
        return option
    return detect_chip() or "A2"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one ternary layer runs on Ascend (see the module docstring)."""

    chip: str
    path: str  # "quant_matmul" | "weight_quant_batchmatmul"
    activation_quant: str | None  # "npu_dynamic_quant" | "aten" | None (weight-only)
    weight_dtype: str  # "int8" | "int4" (int4-packed int32)
    weight_transposed: bool  # the weight is passed as (N, K').t(), else (K, N')
    weight_nz: bool  # FRACTAL_NZ storage (set at preparation on an NPU)
    compute_dtype: torch.dtype
    notes: tuple[str, ...] = ()  # why a faster layout was not taken

    def describe(self, dims: tuple[int, ...] | None = None) -> str:
        """E.g. ``Ascend A2: npu_dynamic_quant -> npu_quant_matmul, int8 (K, N) FRACTAL_NZ`` (``= 96x40`` with ``dims``)."""
        acts = {"npu_dynamic_quant": "npu_dynamic_quant", "aten": "aten int8 quantization", None: ""}[
            self.activation_quant
        ]
        if self.path == "weight_quant_batchmatmul" and acts:
            acts += " (dequantized)"
        ops = " -> ".join(filter(None, (acts, f"npu_{self.path}")))
        shape = {
            ("int8", False): "(K, N)", ("int8", True): "(N, K).t()",
            ("int4", False): "(K, N/8)", ("int4", True): "(N, K/8).t()",
        }[(self.weight_dtype, self.weight_transposed)]  # fmt: skip
        layout = "FRACTAL_NZ" if self.weight_nz else "ND"
        kind = "int4-packed int32" if self.weight_dtype == "int4" else "int8"
        text = f"Ascend {self.chip}: {ops}, {kind} {shape} {layout}"
        if dims is not None:
            text += " = " + "x".join(map(str, dims))
        return text + (f" ({'; '.join(self.notes)})" if self.notes else "")


def compute_dtype(dtype: torch.dtype, chip: str) -> torch.dtype:
    """The activation dtype of the kernels: fp16/bf16 as given on A2/A3 (fp32 → bf16); fp16 on 310P."""
    if chip == "310P":
        return torch.float16
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def plan_layer(
    in_features: int, out_features: int, group_code: int, quantize_activations: bool, dtype: torch.dtype,
    chip: str, *, nz: bool = False, graph_mode: bool = False,
) -> LayerPlan | str:  # fmt: skip
    """The :class:`LayerPlan` of a layer, or the reason it cannot run on the torch_npu kernels.

    ``nz``: the weights live on an NPU, where FRACTAL_NZ storage exists; ``graph_mode``: the
    graph goes to torchair (FRACTAL_NZ weights of ``npu_weight_quant_batchmatmul`` are valid
    in graph mode only). Training graphs quantize the weight every step and plan int8 ND
    (``nz=False``).
    """
    k, n = in_features, out_features
    if chip not in CHIPS:
        raise ValueError(f"bitcpm target 'cann': chip={chip!r} is not one of {CHIPS}")
    if dtype not in _FLOAT_DTYPES:
        return f"input dtype {str(dtype).removeprefix('torch.')} has no torch_npu quantized matmul"
    groups = num_groups(k, group_code)
    per_group = groups > 1
    if per_group and group_code % 32:
        return f"group size {group_code} is not a multiple of 32 (npu_weight_quant_batchmatmul antiquant_group_size)"
    cdtype = compute_dtype(dtype, chip)
    if chip != "310P" and quantize_activations and not per_group:
        if k > MAX_DIM_INT32 or n > MAX_DIM_INT32:
            return f"{n}x{k} exceeds the 2**31-1 dim limit of npu_quant_matmul"
        notes = ("K or N is 1: ND (NZ needs both > 1)",) if nz and 1 in (k, n) else ()
        return LayerPlan(chip, "quant_matmul", "npu_dynamic_quant", "int8", False, nz and 1 not in (k, n), cdtype, notes)
    if k > MAX_LAST_DIM or n > MAX_LAST_DIM:
        return f"{n}x{k} exceeds the {MAX_LAST_DIM} last-dim limit of npu_weight_quant_batchmatmul"
    acts = None if not quantize_activations else ("aten" if chip == "310P" else "npu_dynamic_quant")
    if chip == "310P":
        notes = ("310P: int8 weights, fp16 activations, no npu_dynamic_quant",)
        return LayerPlan(chip, "weight_quant_batchmatmul", acts, "int8", False, False, cdtype, notes)
    return _plan_weight_quant(k, n, group_code, per_group, acts, cdtype, chip, nz and graph_mode, nz)


def _plan_weight_quant(
    k: int, n: int, g: int, per_group: bool, acts: str | None, cdtype: torch.dtype, chip: str, nz_ok: bool, on_npu: bool
) -> LayerPlan:
    """A2/A3 ``npu_weight_quant_batchmatmul`` layouts.

    Source: ops-nn aclnnWeightQuantBatchMatmulV2.md, "FRACTAL_NZ 仅在如下场景下支持".
    """
    notes: list[str] = []
    if on_npu and not nz_ok:
        notes.append("ND: FRACTAL_NZ weights need graph mode (torchair)")
    unit = 1 in (k, n)
    if per_group:
        if n % INT4_PER_INT32:
            notes.append("N % 8 != 0: int8")
            return LayerPlan(chip, "weight_quant_batchmatmul", acts, "int8", False, False, cdtype, tuple(notes))
        fits = g in NZ_GROUP_SIZES and k % g == 0 and n % 64 == 0 and not unit
        if nz_ok and not fits:
            notes.append("ND: FRACTAL_NZ per-group needs g in {64, 128}, K % g == 0, N % 64 == 0")
        return LayerPlan(chip, "weight_quant_batchmatmul", acts, "int4", False, nz_ok and fits, cdtype, tuple(notes))
    per_channel = g != PER_TENSOR
    # A transposed int4 weight with N = 1 is read as K mismatching (torch_npu-npu_weight_quant_batchmatmul.md
    # 约束说明: weight shape (1, 8) int4 with transpose is unsupported), so N = 1 takes the int8 layout.
    if k % INT4_PER_INT32 == 0 and n > 1:
        nz = nz_ok and per_channel and not unit
        if nz_ok and not nz:
            notes.append("ND: FRACTAL_NZ needs per-channel scales and K, N > 1")
        return LayerPlan(chip, "weight_quant_batchmatmul", acts, "int4", True, nz, cdtype, tuple(notes))
    if n % INT4_PER_INT32 == 0:  # int4 NZ per-channel needs the transposed layout, which K % 8 != 0 rules out
        if nz_ok:
            notes.append("ND: int4 FRACTAL_NZ per-channel needs (N, K/8).t(), K % 8 != 0")
        return LayerPlan(chip, "weight_quant_batchmatmul", acts, "int4", False, False, cdtype, tuple(notes))
    nz = nz_ok and per_channel and not unit
    notes.append("int8: no int4 layout fits")
    return LayerPlan(chip, "weight_quant_batchmatmul", acts, "int8", False, nz, cdtype, tuple(notes))
