"""A CPU implementation of the ``torch.ops.npu`` operators bitcompile emits for Ascend.

No Ascend hardware, CANN toolkit or working ``torch_npu`` exists on our machines (installing
torch_npu without CANN breaks ``import torch``). The CANN lowering is therefore written
against the torch_npu 2.14 contract and the CANN kernels' source (``Ascend/op-plugin``,
``hicann/ops-nn``; docs/cann.md cites the files) and verified through this module: the same
schemas, registered with ``torch.library`` under the ``npu`` namespace, with

* fake (meta) impls that run the shape and dtype checks torch_npu's meta registrations run
  (1-D ``pertoken_scale``, broadcastable batch dims, the dtype-combination table,
  transposition of ``x2`` / ``weight`` inferred from strides) plus the documented kernel
  constraints (last dims <= 65535 where the tiling applies it, fp16/bf16 activations, group
  sizes multiple of 32, per-chip support), so that a graph Ascend would reject fails at
  compile time on CPU too;
* CPU kernels that follow the *hardware* formulas where they differ from the documented
  math: ``npu_dynamic_quant`` multiplies by ``127 / rowmax`` (ops-nn ``dynamic_quant*.h``),
  ``npu_quant_matmul``'s two dequantization orders, the small-M "MSD" split of
  ``npu_weight_quant_batchmatmul``, the int64 scale encoding of ``npu_trans_quant_param``
  (both round modes), the low-nibble-first int4 packing with its value masking;
* a model of the FRACTAL_NZ storage tag (format and C0) that ``npu_format_cast`` and
  ``npu_convert_weight_to_int4pack`` set and the matmuls check (:func:`get_npu_format`).

What is chip- or kernel-variant-dependent is a setting of :func:`emulate` (the chip, the
scale form of ``npu_dynamic_quant``, the dequantization order of ``npu_quant_matmul``).

It is a test double, off the production import path: :func:`bitcompile.kernels.npu_ops.ensure_npu_ops`
imports and registers it only when the real torch_npu is not importable, and never when
``torch.ops.npu`` already holds these ops; ``import bitcompile`` and the other targets never
import it. Modules: :mod:`.model` (settings, dtype enums, the NZ tag, int4 / int64 encodings),
:mod:`.quant` (``npu_dynamic_quant``, ``npu_quant_matmul``), :mod:`.weight_quant`
(``npu_weight_quant_batchmatmul`` and its MSD split), :mod:`.formats` (int4pack,
``npu_trans_quant_param``, ``npu_format_cast``).

What the emulator cannot tell us (tie rounding in hardware casts, the NZ byte layout,
performance, which kernel variant the tiling picks) is listed in docs/cann.md.
"""

from __future__ import annotations

import torch

from bitcompile.kernels.npu_emulator import formats, quant, weight_quant
from bitcompile.kernels.npu_emulator.formats import nz_c0
from bitcompile.kernels.npu_emulator.model import (
    ACL_FORMATS,
    CHIPS,
    DEQUANT_ORDERS,
    DTYPE_ENUM,
    DYNAMIC_QUANT_SCALE_FORMS,
    ENUM_OF_DTYPE,
    INT4_PER_INT32,
    MAX_DIM_INT32,
    MAX_LAST_DIM,
    NPU_ONLY_DTYPES,
    EmulatorModel,
    as_dtype,
    current_model,
    decode_quant_param,
    emulate,
    encode_quant_param,
    get_npu_format,
    is_transposed,
    pack_int4,
    storage_format,
    unpack_int4,
)
from bitcompile.kernels.npu_emulator.quant import dynamic_quant_rows, quant_matmul_dim_limit
from bitcompile.kernels.npu_emulator.weight_quant import MSD_FACTORS, MSD_M_LIMIT, msd_route, msd_split, msd_weights

# for BC: the provider probe and the torch_npu facts moved to bitcompile.kernels.npu_ops
from bitcompile.kernels.npu_ops import (
    ACL_FORMAT_FRACTAL_NZ,
    ACL_FORMAT_ND,
    SCHEMAS,
    ensure_npu_ops,
    provider,
    torch_npu_works,
)

#: op name -> (CPU kernel, fake impl) for every op in :data:`SCHEMAS`
IMPLS = {**quant.IMPLS, **weight_quant.IMPLS, **formats.IMPLS}


def register(lib: torch.library.Library) -> torch.library.Library:
    """Define the ops of :data:`SCHEMAS` in ``lib`` (an ``npu`` DEF library) with their CPU kernels and fakes."""
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        cpu, fake = IMPLS[name]
        lib.impl(name, cpu, "CPU")
        torch.library.register_fake(f"npu::{name}", fake, lib=lib)
    return lib


__all__ = [
    "ACL_FORMATS", "ACL_FORMAT_FRACTAL_NZ", "ACL_FORMAT_ND", "CHIPS", "DEQUANT_ORDERS", "DTYPE_ENUM",
    "DYNAMIC_QUANT_SCALE_FORMS", "ENUM_OF_DTYPE", "IMPLS", "INT4_PER_INT32", "MAX_DIM_INT32", "MAX_LAST_DIM",
    "MSD_FACTORS", "MSD_M_LIMIT", "NPU_ONLY_DTYPES", "SCHEMAS", "EmulatorModel", "as_dtype", "current_model",
    "decode_quant_param", "dynamic_quant_rows", "emulate", "encode_quant_param", "ensure_npu_ops", "get_npu_format",
    "is_transposed", "msd_route", "msd_split", "msd_weights", "nz_c0", "pack_int4", "provider", "quant_matmul_dim_limit",
    "register", "storage_format", "torch_npu_works", "unpack_int4",
]  # fmt: skip
