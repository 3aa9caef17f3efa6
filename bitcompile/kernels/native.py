"""The serving kernels as C++ torch operators (``torch.ops.bitcpm_native.*``), built on first use.

Why: inductor calls a C++ operator through the dispatcher (from its Python wrapper, or with
no Python at all under ``cpp_wrapper=True`` / AOTInductor); the Python custom ops of
:mod:`bitcompile.ops` run Python per layer and token. ``csrc/bc_torch_ops.cpp`` registers
``bitcpm_native::ternary_linear_packed``, ``int8_dense_linear``, ``float_gemv_linear`` and
``decode_attention`` with ``TORCH_LIBRARY``; the first three call the same ISA-dispatched C kernels
(``_bitcpm_cpu*.so``, which the op library links against).

How it is built: with ``torch.utils.cpp_extension.load`` (g++ and ninja) into a cache
directory the first time :func:`load` is called, because ``pip install`` builds the C kernels
without torch headers (build isolation). ``BITCOMPILE_CACHE_DIR`` moves the cache
(default ``~/.cache/bitcompile``). Where it cannot be built (no C kernels, no compiler or
ninja), :func:`load` returns False and :func:`unavailable_reason` says why; callers keep
the Python ops.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from bitcompile.kernels.cpu import library

SOURCE = Path(__file__).resolve().parent / "csrc" / "bc_torch_ops.cpp"
_HEADER = SOURCE.parent / "bc_kernels.h"
_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where the op library is built: ``$BITCOMPILE_CACHE_DIR/native_ops`` (default ``~/.cache/bitcompile``)."""
    root = os.environ.get("BITCOMPILE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bitcompile")
    return Path(root) / "native_ops"


def _build_key(c_library: Path) -> str:
    """One build per op source, C header, C library file and torch version (a rebuilt C library
    gets a fresh op library linked against it)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _HEADER.read_bytes(), str(c_library.resolve()).encode(), torch.__version__.encode()):
        h.update(part)
    stat = c_library.stat()
    h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load() -> bool:
    """Build (first time) and load the op library; True when ``torch.ops.bitcpm_native`` is usable.
    Never raises: a failure is remembered and :func:`unavailable_reason` explains it."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok, reason = _build_and_load()
        _state["ok"], _state["reason"] = ok, reason
        return ok


def unavailable_reason() -> str | None:
    """Why :func:`load` returned False (None before the first call or when it succeeded)."""
    return _state.get("reason")  # type: ignore[return-value]


def _build_and_load() -> tuple[bool, str | None]:
    if library.LIB is None:
        return False, f"the C kernels are not loaded ({library.UNAVAILABLE_REASON})"
    c_library = library.find_library()
    if c_library is None or not SOURCE.exists():
        return False, f"the C kernels' library or {SOURCE.name} is missing from the installed package"
    try:
        from torch.utils import cpp_extension

        build_dir = cache_dir() / _build_key(c_library)
        build_dir.mkdir(parents=True, exist_ok=True)
        lib_dir = str(c_library.resolve().parent)
        cpp_extension.load(
            name="bitcpm_native_ops",
            sources=[str(SOURCE)],
            extra_include_paths=[str(SOURCE.parent)],
            extra_cflags=["-O2", "-ffp-contract=off"],
            extra_ldflags=[f"-L{lib_dir}", f"-l:{c_library.name}", f"-Wl,-rpath,{lib_dir}"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a header mismatch: the Python ops keep working
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"the C++ torch operators could not be built ({type(e).__name__}: {first_line})"
    _register_fakes()
    return True, None


def _out_like(x: Tensor, n: int, dtype: torch.dtype | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=dtype or x.dtype)


def _register_fakes() -> None:
    """Shapes for tracing (Dynamo, inductor, export): the ops' outputs from their inputs."""

    @torch.library.register_fake("bitcpm_native::ternary_linear_packed")
    def _ternary(x, packed, scales, bias, in_features, group_size, isa):
        torch._check(x.shape[-1] == in_features, lambda: f"activations have {x.shape[-1]} features, the layer takes {in_features}")
        return _out_like(x, packed.shape[0])

    @torch.library.register_fake("bitcpm_native::int8_dense_linear")
    def _int8(x, codes, scales, bias, isa):
        return _out_like(x, codes.shape[0], torch.float32)

    @torch.library.register_fake("bitcpm_native::float_gemv_linear")
    def _gemv(x, weight, bias, isa):
        return _out_like(x, weight.shape[0])

    @torch.library.register_fake("bitcpm_native::decode_attention")
    def _attention(q, k, v, mask, scale):
        torch._check(q.shape[2] == 1, lambda: f"decode_attention: one query per sequence, got {q.shape[2]}")
        return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))
