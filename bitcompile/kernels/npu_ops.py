"""Who provides ``torch.ops.npu``: the real torch_npu, someone else, or bitcompile's CPU emulator.

No Ascend hardware, CANN toolkit or working ``torch_npu`` exists on our machines (installing
torch_npu without CANN breaks ``import torch``), so ``target="cann"`` runs against
:mod:`bitcompile.kernels.npu_emulator` when torch_npu is absent. This module holds what
production needs of that arrangement (the torch_npu schemas of the ops bitcompile emits, the
storage-format ids, and the probe) and imports the emulator only when it is the provider.

The probe never imports a torch_npu that might be broken into this process: a broken install
is detected in a subprocess (see :func:`torch_npu_works`). torch_npu is never imported when
bitcompile is imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading

import torch

log = logging.getLogger(__name__)

#: The torch_npu 2.14 schemas, verbatim (wheel ``npu_native_functions_by_codegen.yaml``).
SCHEMAS: dict[str, str] = {
    "npu_dynamic_quant": (
        "npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
        'int? dst_type=None, str quant_mode="pertoken", float dst_type_max=0.0) -> (Tensor, Tensor)'
    ),
    "npu_quant_matmul": (
        "npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
        "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, "
        "int? x2_dtype=None, int? pertoken_scale_dtype=None, int? scale_dtype=None, "
        "int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor"
    ),
    "npu_weight_quant_batchmatmul": (
        "npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
        "Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, "
        "Tensor? bias=None, int antiquant_group_size=0, int inner_precise=0, int? weight_dtype=None) -> Tensor"
    ),
    "npu_convert_weight_to_int4pack": "npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor",
    "npu_trans_quant_param": "npu_trans_quant_param(Tensor scale, Tensor? offset=None, int? round_mode=0) -> Tensor",
    "npu_format_cast": (
        "npu_format_cast(Tensor self, int acl_format, *, int? customize_dtype=None, int? input_dtype=None) -> Tensor"
    ),
}

#: torch_npu.Format values of the storage formats bitcompile uses ((beta)torch_npu-npu_format_cast.md)
ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 2, 29

_lock = threading.Lock()
_provider: str | None = None
_library: torch.library.Library | None = None


def _defined(name: str) -> bool:
    try:
        return hasattr(torch.ops.npu, name)
    except (AttributeError, RuntimeError):
        return False


def torch_npu_works() -> bool:
    """Whether a working torch_npu is installed, without risking this process.

    torch_npu registers a ``torch.backends`` entry point: with auto-loading on (the default),
    ``import torch`` already imported it, so it is in ``sys.modules`` when it works. If it is
    installed but not loaded, it is imported in a *subprocess* with auto-loading off: a broken
    install (no CANN: ``libhccl.so`` missing) fails there, not here, and cannot leave a
    half-imported torch_npu behind.
    """
    if sys.modules.get("torch_npu") is not None:
        return True
    try:
        if importlib.util.find_spec("torch_npu") is None:
            return False
    except (ImportError, ValueError):
        return False
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import torch, torch_npu"], env=env, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("bitcompile: probing torch_npu failed (%s); using the CPU emulator of torch.ops.npu", err)
        return False
    if probe.returncode != 0:
        tail = (probe.stderr or "").strip().splitlines()[-1:] or ["no output"]
        log.warning("bitcompile: torch_npu is installed but does not import (%s); using the CPU emulator", tail[0])
        return False
    return True


def ensure_npu_ops() -> str:
    """Make ``torch.ops.npu.*`` (the six ops bitcompile emits) callable; return who provides them.

    Returns ``"torch_npu"`` (the real library, imported here), ``"external"`` (someone already
    defined these ops, left alone) or ``"emulator"`` (:mod:`bitcompile.kernels.npu_emulator`, a CPU implementation).
    Idempotent and thread-safe.
    """
    global _provider, _library
    with _lock:
        if _provider is not None:
            return _provider
        if torch_npu_works():
            import torch_npu  # noqa: F401  (registers torch.ops.npu.* for real)

            _provider = "torch_npu"
        elif any(_defined(name) for name in SCHEMAS):
            _provider = "external"
        else:
            # the test double, imported only here: a process with torch_npu never loads it
            from bitcompile.kernels.npu_emulator import register

            _library = register(torch.library.Library("npu", "DEF"))  # noqa: TOR901 (kept alive in _library)
            _provider = "emulator"
        log.info("bitcompile: torch.ops.npu provided by %s", _provider)
        return _provider


def provider() -> str | None:
    """Who provides ``torch.ops.npu`` (None until :func:`ensure_npu_ops` ran)."""
    return _provider
