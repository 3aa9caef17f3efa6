"""Loading the C kernels (``_bitcpm_cpu*.so``) with ctypes, checking their ABI, choosing the ISA.

The C code in ``csrc/`` is compiled by the package's own build (setup.py, no PyTorch
headers) and loaded here. Without it (no compiler at install time, another OS), or when the
library's structs differ from the ctypes mirrors below (a stale build), :data:`LIB` is None,
:func:`available` returns False and every kernel of :mod:`bitcompile.kernels.cpu` runs the
reference instead; a warning says so once.

The ISA is chosen at run time from cpuid (``avx512`` = AVX-512 F/BW/VL/DQ + VNNI, then
``avx2``, then ``scalar``); ``BITCOMPILE_ISA=avx512|avx2|scalar`` forces one (the tests do).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from bitcompile.kernels.packing import BLOCK_K

log = logging.getLogger("bitcompile.kernels.cpu")

ISA_NAMES = {"scalar": 0, "avx2": 1, "avx512": 2}
ISA_BY_ID = {v: k for k, v in ISA_NAMES.items()}
_ISA_ALIASES = {"generic": "scalar", "portable": "scalar", "c": "scalar", "avx512_vnni": "avx512", "avx512vnni": "avx512"}


# ctypes mirrors of csrc/bc_kernels.h; bc_struct_size(BC_STRUCT_*) must agree (checked at load).
class GemmArgs(ctypes.Structure):
    """``bc_gemm_args``: one packed GEMM call."""

    _fields_ = [
        ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("Kp", ctypes.c_int),
        ("group", ctypes.c_int), ("G", ctypes.c_int),
        ("xq", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("corr", ctypes.c_void_p),
        ("unit_chunks", ctypes.c_int), ("n_units", ctypes.c_int),
        ("xf", ctypes.c_void_p), ("ldxf", ctypes.c_int64),
        ("w", ctypes.c_void_p), ("sw", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64), ("out_bf16", ctypes.c_int), ("bias_bf16", ctypes.c_int),
        ("layout", ctypes.c_int),  # LAYOUT_I2 / LAYOUT_T5
    ]  # fmt: skip


class PrepArgs(ctypes.Structure):
    """``bc_prep_args``: per-token int8 quantization (or copy) of activations."""

    _fields_ = [
        ("M", ctypes.c_int), ("K", ctypes.c_int), ("Kp", ctypes.c_int),
        ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("x_kind", ctypes.c_int),
        ("xq", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("corr", ctypes.c_void_p),
        ("unit_chunks", ctypes.c_int), ("n_units", ctypes.c_int), ("colscale", ctypes.c_void_p),
    ]  # fmt: skip


class DenseArgs(ctypes.Structure):
    """``bc_dense_args``: a dense fp32 or W8A8 layer."""

    _fields_ = [
        ("M", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int),
        ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("w", ctypes.c_void_p), ("ldw", ctypes.c_int64),
        ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64),
        ("xq", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("Kp", ctypes.c_int),
        ("wq", ctypes.c_void_p), ("sw", ctypes.c_void_p), ("xsum", ctypes.c_void_p),
    ]  # fmt: skip


class EwArgs(ctypes.Structure):
    """``bc_ew_args``: one elementwise pass over rows (csrc/bc_passes.c)."""

    _fields_ = [
        ("op", ctypes.c_int), ("M", ctypes.c_int), ("N", ctypes.c_int),
        ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("x_kind", ctypes.c_int),
        ("col", ctypes.c_void_p), ("row", ctypes.c_void_p), ("scalar", ctypes.c_float), ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("ldo", ctypes.c_int64), ("out_bf16", ctypes.c_int),
    ]  # fmt: skip


#: ``BC_STRUCT_*`` id in csrc/bc_kernels.h -> the ctypes mirror of that struct.
#: ``bc_gemm_args.layout``: the canonical 2-bit layout, the 1.6-bit one (kernels/packing_base3.py)
LAYOUT_I2, LAYOUT_T5 = 0, 1

SHARED_STRUCTS: dict[int, type[ctypes.Structure]] = {0: GemmArgs, 1: PrepArgs, 2: DenseArgs, 3: EwArgs}


def find_library() -> Path | None:
    """The built C library: ``BITCOMPILE_CPU_LIB`` if set, else ``kernels/_bitcpm_cpu*.so``."""
    override = os.environ.get("BITCOMPILE_CPU_LIB")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitcpm_cpu{suffix}"
        if candidate.exists():
            return candidate
    return None


def abi_mismatch(lib: ctypes.CDLL, structs: dict[int, type[ctypes.Structure]] | None = None) -> str | None:
    """Why ``lib``'s structs do not match their ctypes mirrors (None when every size agrees).

    A field added on one side only shifts every field after it: the C code would read
    pointers from the wrong offsets. The library reports ``sizeof`` of each struct.
    """
    if not hasattr(lib, "bc_struct_size"):
        return "the library predates the struct-size check (bc_struct_size is missing); rebuild it"
    structs = SHARED_STRUCTS if structs is None else structs
    size_of = lib.bc_struct_size
    size_of.argtypes, size_of.restype = [ctypes.c_int], ctypes.c_size_t
    wrong = [
        f"{struct.__name__} is {ctypes.sizeof(struct)} bytes in Python, {size_of(which)} in C"
        for which, struct in structs.items()
        if size_of(which) != ctypes.sizeof(struct)
    ]
    return "; ".join(wrong) or None


def load(path: Path | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why not)`` when it is missing, unloadable or of another ABI."""
    path = find_library() if path is None else path
    if path is None:
        return None, (
            "the C kernels were not built (no C compiler when bitcompile was installed?); "
            "running the pure-PyTorch reference kernels. Reinstall with a C compiler to get them"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"could not load the C kernels from {path} ({e}); running the reference kernels"
    mismatch = abi_mismatch(lib)
    if mismatch is not None:
        return None, (
            f"the C kernels in {path} do not match this bitcompile ({mismatch}); running the reference "
            "kernels. Rebuild them (pip install -e . or python setup.py build_ext --inplace)"
        )
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for name, argtypes, restype in (
        ("bc_isa_supported", [I], I),
        ("bc_best_isa", [], I),
        ("bc_plan_i8", [I, I, I, ctypes.POINTER(ctypes.c_int)], I),
        ("bc_plan_t5_i8", [I, I, I, ctypes.POINTER(ctypes.c_int)], I),
        ("bc_plan_f32", [I, I], I),
        ("bc_gemm_i8", [ctypes.POINTER(GemmArgs), I, I], None),
        ("bc_gemm_f32", [ctypes.POINTER(GemmArgs), I, I], None),
        ("bc_prep_i8", [ctypes.POINTER(PrepArgs), I, I], None),
        ("bc_linear_i8", [ctypes.POINTER(GemmArgs), P, I64, I, I, P, I, I], I),
        ("bc_dense_f32", [ctypes.POINTER(DenseArgs), I, I], None),
        ("bc_dense_i8", [ctypes.POINTER(DenseArgs), I, I], None),
        ("bc_plan_dense_i8", [I], I),
        ("bc_pack_i2", [P, I64, I, I, P, I], I),
        ("bc_read_bytes", [P, ctypes.c_size_t, I], ctypes.c_uint64),
        ("bc_ew", [ctypes.POINTER(EwArgs), I, I], None),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib, None


#: The loaded library, or None (then :data:`UNAVAILABLE_REASON` says why). Read it as
#: ``library.LIB`` at call time: the tests replace it to simulate a missing build.
LIB, UNAVAILABLE_REASON = load()
_warned = False


def available() -> bool:
    """True when the compiled C kernels are loaded (else every function runs the reference)."""
    return LIB is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    return UNAVAILABLE_REASON


def handle() -> ctypes.CDLL | None:
    """:data:`LIB`; when it is None, logs the reason once (the caller then runs the reference)."""
    global _warned
    if LIB is None and not _warned:
        _warned = True
        log.warning("bitcompile.kernels.cpu: %s", UNAVAILABLE_REASON)
    return LIB


def isa_supported(name: str) -> bool:
    """Whether this CPU (and the loaded library) can run ISA ``name`` (scalar, avx2, avx512)."""
    name = _ISA_ALIASES.get(name, name)
    return LIB is not None and name in ISA_NAMES and bool(LIB.bc_isa_supported(ISA_NAMES[name]))


_isa_cache: dict[str, int] = {}


def isa_id() -> int:
    """The ISA to run now: ``BITCOMPILE_ISA`` if set (and supported), else the best one."""
    env = os.environ.get("BITCOMPILE_ISA", "auto")
    found = _isa_cache.get(env)
    if found is None:
        found = _isa_cache[env] = _resolve_isa(env)
    return found


def _resolve_isa(env: str) -> int:
    want = env.strip().lower()
    want = _ISA_ALIASES.get(want, want)
    if want in ("", "auto"):
        return LIB.bc_best_isa()
    if want not in ISA_NAMES:
        raise ValueError(f"BITCOMPILE_ISA={want!r} is not one of: auto, {', '.join(ISA_NAMES)}")
    if not LIB.bc_isa_supported(ISA_NAMES[want]):
        raise ValueError(f"BITCOMPILE_ISA={want!r}: this CPU does not support it; unset it or pick another ISA")
    return ISA_NAMES[want]


def isa() -> str:
    """Name of the ISA the kernels run on now ("reference" when the C kernels are unavailable)."""
    return ISA_BY_ID[isa_id()] if LIB is not None else "reference"


def kernel_isa(group_code: int, activations: str = "int8") -> str:
    """ISA of the kernel that actually runs for this group mode (some group sizes use the scalar kernel)."""
    if LIB is None:
        return "reference"
    if activations == "int8":
        return ISA_BY_ID[LIB.bc_plan_i8(isa_id(), group_code, BLOCK_K, ctypes.byref(ctypes.c_int()))]
    return ISA_BY_ID[LIB.bc_plan_f32(isa_id(), group_code)]


def ptr(t: Tensor | None) -> int | None:
    """``t``'s data pointer for a ctypes ``void *`` field (None for a missing tensor)."""
    return None if t is None else t.data_ptr()


def threads() -> int:
    """Threads a C call may use: torch's intra-op count."""
    return max(1, torch.get_num_threads())


def on_cpu(*ts: Tensor) -> bool:
    """Whether every tensor is on the CPU (the C kernels read host memory)."""
    return all(t.device.type == "cpu" for t in ts)


def is_degenerate(m: int, n: int, k: int) -> bool:
    """An empty GEMM: the reference handles it (the C kernels assume M, N, K > 0)."""
    return m == 0 or n == 0 or k == 0
