"""Serving objects: one foreign call per layer for eager decode (docs/serving.md).

:class:`PreparedPackedLinear` keeps a packed layer's kernel arguments in a ctypes struct;
:func:`dense_linear` and :func:`int8_dense_linear` are the multi-threaded small-M dense layers
(the tied fp32 head, the W8A8 head).
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.cpu import gemm, library
from bitcompile.kernels import packing_base3
from bitcompile.kernels.cpu.base3 import check_base3_args, plan_base3
from bitcompile.kernels.cpu.library import LAYOUT_I2, LAYOUT_T5, DenseArgs, GemmArgs, is_degenerate, on_cpu, ptr, threads
from bitcompile.kernels.cpu.passes import prepare_activations
from bitcompile.kernels.groups import PER_TENSOR, num_groups
from bitcompile.kernels.packing import check_packed_args, padded_in_features

FLOAT_ACTIVATIONS = (torch.float32, torch.bfloat16)

def can_prepare(packed: Tensor, w_scales: Tensor, bias: Tensor | None) -> bool:
    """Whether :class:`PreparedPackedLinear` can read these tensors as they are (no copy)."""
    return (
        packed.dtype == torch.uint8 and packed.is_contiguous() and w_scales.dtype == torch.float32
        and w_scales.is_contiguous()
        and (bias is None or (bias.dtype in FLOAT_ACTIVATIONS and bias.is_contiguous()))
    )  # fmt: skip


def tensor_state(t: Tensor) -> tuple[int, int]:
    """Where a tensor's data is and how often it was changed in place. Inference-mode tensors
    have no version counter; they cannot be changed outside inference mode."""
    return t.data_ptr(), (-2 if t.is_inference() else t._version)


class PreparedPackedLinear:
    """A packed layer's constant kernel arguments, validated and laid out once.

    Why: a decode step calls every layer with one token, where the kernel itself takes a few
    microseconds; validating, converting and allocating on every call cost several times
    that (docs/serving.md). Calling this object quantizes the activations and runs the GEMM
    in one C call.

    The C code reads the caller's tensors themselves, never a copy: an in-place change that
    leaves no trace (``.data.copy_()``, ``load_state_dict`` on inference tensors, which have no
    version counter) is seen by the next call. So ``packed`` and ``w_scales`` must be
    contiguous (uint8, fp32) and ``bias`` a contiguous fp32 or bf16 vector (the kernel reads
    bf16 as it is). It keeps that storage alive (so calling it is always memory-safe) but only
    weak references to the caller's tensor objects (a cache keyed by them must not keep them
    alive). :meth:`is_current` / :meth:`serves` say whether it still reads the tensors that
    describe the layer: same objects, same data pointers (``.data =`` moves them), same
    version (``resize_`` and other in-place changes of the metadata bump it).
    """

    def __init__(
        self, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None,
        layout: str = "2bit",
    ):  # fmt: skip
        if library.handle() is None:
            raise RuntimeError(f"PreparedPackedLinear needs the C kernels: {library.UNAVAILABLE_REASON}")
        if layout not in ("2bit", "1.6bit"):
            raise ValueError(f"PreparedPackedLinear: layout={layout!r} is not one of '2bit', '1.6bit'")
        probe = torch.empty((0, in_features))
        check = check_base3_args if layout == "1.6bit" else check_packed_args
        check("PreparedPackedLinear", probe, packed, w_scales, in_features, group_code, bias)
        if not on_cpu(packed, w_scales, *([bias] if bias is not None else [])):
            raise ValueError("PreparedPackedLinear: packed, scales and bias must be CPU tensors")
        if not can_prepare(packed, w_scales, bias):
            raise ValueError(
                "PreparedPackedLinear: packed (uint8), scales (fp32) and bias (fp32 or bf16) must be contiguous "
                f"tensors of those dtypes, got {packed.dtype}, {w_scales.dtype}, {None if bias is None else bias.dtype}"
            )
        self._sources = tuple(None if t is None else weakref.ref(t) for t in (packed, w_scales, bias))
        self._snapshot = self._state_of(packed, w_scales, bias)
        self.isa_id = library.isa_id()  # NOTE: fixed here; BITCOMPILE_ISA set later needs a new object
        self._storages = tuple(t.untyped_storage() for t in (packed, w_scales, bias) if t is not None)
        # new tensor objects on the caller's storage (not the caller's objects, which are held weakly)
        self._packed_view, self._scales_view, self._bias = (
            None if t is None else torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
            for t in (packed, w_scales, bias)
        )  # fmt: skip
        w, sw, b = packed, w_scales, bias
        self.layout = layout
        uc = ctypes.c_int()
        self._linear_i8 = library.LIB.bc_linear_i8  # bound once: this call runs per layer and token
        if layout == "1.6bit":
            kp = packing_base3.padded_in_features(in_features)
            self.run_isa, uc.value = plan_base3(self.isa_id, group_code, kp)
        else:
            kp = padded_in_features(in_features)
            self.run_isa = library.LIB.bc_plan_i8(self.isa_id, group_code, kp, ctypes.byref(uc))
        n_units = -(-(kp // 64) // uc.value) if self.run_isa != 0 else 0
        self.out_features = n = packed.shape[0]
        self.in_features, self.group_code = in_features, group_code
        self._args = GemmArgs(
            0, n, in_features, kp, group_code, num_groups(in_features, group_code), None, None, None, uc.value, n_units,
            None, 0, ptr(w), ptr(sw), ptr(b), None, n, 0, int(b is not None and b.dtype == torch.bfloat16),
            LAYOUT_T5 if layout == "1.6bit" else LAYOUT_I2,
        )  # fmt: skip
        self._args_bf16 = GemmArgs.from_buffer_copy(self._args)
        self._args_bf16.out_bf16 = 1

    @staticmethod
    def _state_of(packed: Tensor, w_scales: Tensor, bias: Tensor | None) -> tuple:
        return tensor_state(packed), tensor_state(w_scales), None if bias is None else tensor_state(bias)

    def is_current(self, packed: Tensor, w_scales: Tensor, bias: Tensor | None) -> bool:
        """Whether these are the tensors this object was built from, unchanged since (an
        in-place update bumps a version, ``.data =`` or ``share_memory_()`` moves the data,
        a replaced buffer is another object)."""
        src = self._sources
        return (
            packed is src[0]() and w_scales is src[1]() and (bias is None if src[2] is None else bias is src[2]())
            and self._state_of(packed, w_scales, bias) == self._snapshot
        )  # fmt: skip

    def serves(self, x: Tensor, buffers: dict[str, Tensor | None]) -> bool:
        """:meth:`is_current` for ``buffers["packed"]`` / ``["scales"]`` / ``["bias"]``, and ``x``
        is a CPU fp32/bf16 tensor of ``in_features`` (runs once per layer and token)."""
        return (
            x.dtype in FLOAT_ACTIVATIONS and x.is_cpu and x.shape[-1] == self.in_features
            and self.is_current(buffers["packed"], buffers["scales"], buffers["bias"])
        )  # fmt: skip

    def __call__(self, x: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        """``packed_linear(x, ..., quantize_activations=True, out_dtype)`` for CPU fp32/bf16 ``x``
        of shape ``(..., in_features)``; the output has shape ``(..., out_features)`` and
        ``out_dtype`` (default: ``x.dtype``)."""
        k = self.in_features
        if x.dtype not in FLOAT_ACTIVATIONS or not x.is_cpu:
            raise TypeError(f"PreparedPackedLinear: activations must be CPU float32/bfloat16, got {x.dtype} on {x.device}")
        if x.shape[-1] != k:
            raise ValueError(f"PreparedPackedLinear: activations have {x.shape[-1]} features, the layer takes {k}")
        if out_dtype is None:
            out_dtype = x.dtype
        if not x.is_contiguous():
            x = x.contiguous()
        bf16 = out_dtype == torch.bfloat16
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.bfloat16 if bf16 else torch.float32)
        m = x.numel() // k if k else 0
        if k == 0:  # an empty sum: the bias alone
            y.copy_(self._bias.float().expand_as(y)) if self._bias is not None else y.zero_()
        elif m >= gemm.ONEDNN_MIN_TOKENS and self.out_features and self.group_code <= PER_TENSOR and self.layout == "2bit":
            kind = 0 if x.dtype == torch.float32 else 1
            w, sw, b = self._packed_view, self._scales_view, self._bias
            gemm.packed_int8_onednn(x.view(m, k), kind, None, w, sw, k, b, y.view(m, -1))
        elif m and self.out_features:
            args = self._args_bf16 if bf16 else self._args
            kind = 0 if x.dtype == torch.float32 else 1
            if self._linear_i8(args, x.data_ptr(), k, kind, m, y.data_ptr(), self.run_isa, threads()):
                raise MemoryError(f"bitcompile: no memory for the int8 activations of {m} tokens x {k} features")
        return y if y.dtype == out_dtype else y.to(out_dtype)


DENSE_MAX_M = 8  # above this, torch's (multi-threaded) GEMM is the faster path


def dense_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fp32 ``x2d @ weight^T (+ bias)`` for small M on all threads (torch's M=1 fp32 GEMV is
    single-threaded); torch's ``F.linear`` otherwise. Agrees with it within fp32 rounding."""
    if (
        library.handle() is None
        or x2d.dim() != 2
        or x2d.shape[0] > DENSE_MAX_M
        or x2d.dtype != torch.float32
        or weight.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
        or not on_cpu(x2d, weight)
        or weight.stride(-1) != 1
        or (bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_cpu))
        or torch.is_grad_enabled() and (x2d.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad)
    ):
        return torch.nn.functional.linear(x2d, weight, bias)  # incl. a broadcast bias
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    n, k = weight.shape
    if x2d.shape[1] != k:
        raise ValueError(f"dense_linear: activations have {x2d.shape[1]} features, the weight has {k}")
    m = x2d.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    if m and n:
        b = None if bias is None else bias.contiguous()
        a = DenseArgs(m, n, k, x2d.data_ptr(), x2d.stride(0), weight.data_ptr(), weight.stride(0), ptr(b), y.data_ptr(), n)  # fmt: skip
        library.LIB.bc_dense_f32(ctypes.byref(a), library.isa_id(), threads())
    return y


_INT8_DENSE_MAX_K = 65_000  # (x + 128) * w sums stay within int32 up to 66,000 products


def int8_dense_linear(
    x2d: Tensor, w_codes: Tensor, w_scales: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """W8A8 dense layer (contract of :func:`reference.int8_dense_linear`, bit-identical): per-token
    int8 activations x per-row int8 weights with VNNI, on all threads.

    Keeps nothing derived from the weights between calls (the kernel's correction term is a sum
    over the activations), so writes no version counter records are seen at once.
    """
    n, k = w_codes.shape
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"int8_dense_linear: activations must be 2-D (M, {k}), got shape {tuple(x2d.shape)}")
    if w_codes.dtype != torch.int8 or tuple(w_scales.shape) != (n, 1):
        raise ValueError(
            f"int8_dense_linear: weights must be int8 (N, K) codes with fp32 (N, 1) scales, got "
            f"{w_codes.dtype} {tuple(w_codes.shape)} and {tuple(w_scales.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"int8_dense_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    m = x2d.shape[0]
    if (
        library.handle() is None
        or is_degenerate(m, n, k)
        or not on_cpu(x2d, w_codes)
        or x2d.dtype not in FLOAT_ACTIVATIONS
        or out_dtype != torch.float32
        or k > _INT8_DENSE_MAX_K
    ):
        return reference.int8_dense_linear(x2d, w_codes, w_scales, bias, out_dtype)
    x = x2d.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    kp = padded_in_features(k)
    run_isa = library.LIB.bc_plan_dense_i8(library.isa_id())
    xq, sx, _, _ = prepare_activations(x, 0 if x.dtype == torch.float32 else 1, k, kp, run_isa, None)
    wq = w_codes if w_codes.stride(-1) == 1 else w_codes.contiguous()
    sw = w_scales.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    a = DenseArgs(
        m, n, k, None, 0, None, wq.stride(0), ptr(b), y.data_ptr(), n,
        xq.data_ptr(), sx.data_ptr(), kp, wq.data_ptr(), sw.data_ptr(), None,
    )  # fmt: skip
    library.LIB.bc_dense_i8(ctypes.byref(a), run_isa, threads())
    return y

