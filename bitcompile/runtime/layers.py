"""The layers a packed model is made of: :class:`PackedTernaryLinear` (2-bit ternary weights)
and :class:`FloatGemvLinear` (an fp32 ``nn.Linear`` that ``pack`` keeps, served by bitcompile's
GEMV at decode sizes). The int8 head's layers are in :mod:`bitcompile.runtime.int8_head`.

Eager calls go to the kernels directly (the op's dispatch costs about as much as a decode
GEMV); compiled graphs and export see the ``bitcpm::`` ops (:mod:`bitcompile.ops`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from bitcompile.config import BitcompileWarning, TernaryConfig
from bitcompile.targets import get_kernel, resolve_target
from bitcompile.kernels import packing, packing_base3
from bitcompile.kernels.groups import ScaleGroups, num_groups
from bitcompile.kernels.packing import pack_codes, packed_shape, unpack_codes
from bitcompile.ops import float_gemv, prepared_cpu_call  # (importing it registers torch.ops.bitcpm.*)
from bitcompile.runtime.conversion import FixedFormatModule

_warned_compiled_base3 = False

__all__ = ["LAYOUTS", "FloatGemvLinear", "PackedTernaryLinear", "PackedWeightInfo", "check_layout"]

#: pack(layout=...) names -> (layout name, version) of the packed bytes. "2bit": the canonical
#: layout (kernels/packing.py); "1.6bit": five weights per byte (kernels/packing_base3.py).
LAYOUTS = {
    "2bit": (packing.LAYOUT_NAME, packing.LAYOUT_VERSION),
    "1.6bit": (packing_base3.LAYOUT_NAME, packing_base3.LAYOUT_VERSION),
}


def check_layout(where: str, layout: object) -> str:
    """``layout`` if it names a packed layout, else one ValueError naming the choices."""
    if not (isinstance(layout, str) and layout in LAYOUTS):
        raise ValueError(f"{where}: layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    return layout



class PackedWeightInfo:
    """What a packed layer's ``weight`` tells model code: ``shape``, ``dtype``, ``device``, no values.

    Why: model code reads ``self.wo.weight.dtype`` (T5 casts its activations to it) or
    ``layer.weight.shape`` of the ``nn.Linear`` it built; a packed layer has 2-bit codes and fp32
    scales, not a float matrix, and materialising one on every read would undo the packing.
    ``dtype`` is the dtype of the float layer it stands in for (it follows ``.half()`` etc.),
    ``device`` where the codes are. It is not a ``torch.Tensor`` (``isinstance`` says so, which is
    how T5 tells a quantized weight); anything that needs the values raises an AttributeError
    naming ``dequantized_weight()``.
    """

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def requires_grad(self) -> bool:
        return False

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getattr__(self, name: str):
        raise AttributeError(
            f"the weight of a packed ternary layer is 2-bit codes + fp32 scales: it has shape, dtype and device "
            f"but no .{name}; call the layer's dequantized_weight() for the (out, in) float matrix"
        )

    def __repr__(self) -> str:
        return f"PackedWeightInfo(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class PackedTernaryLinear(FixedFormatModule):
    """A linear layer with packed ternary weights: ``y = x @ (codes * scales)^T + bias``.

    ``layout``: ``"2bit"`` (the canonical layout, the default) or ``"1.6bit"`` (five weights
    per byte, :mod:`bitcompile.kernels.packing_base3`; 20 % fewer bytes). Both give the same
    outputs bit for bit. The 1.6-bit layer runs its own kernels in eager calls; compiled graphs,
    autograd and export see ``bitcpm::ternary_linear_packed`` on a 2-bit copy of its codes made
    per call (:meth:`packed_2bit`), so the result is the same there too, only slower.

    Buffers: ``packed`` (uint8, in ``layout``), ``scales`` (fp32 ``(out, n_groups)``),
    ``bias`` (original dtype, optional). Inference only: it has no trainable weight.
    ``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` convert the bias only; ``packed`` and
    ``scales`` keep their format (:mod:`bitcompile.runtime.conversion`).
    """

    format_buffers = ("packed", "scales")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        group_size: int | str | ScaleGroups = -1,
        activations: str | None = "int8",
        dtype: torch.dtype = torch.float32,
        target: str = "auto",
        layout: str = "2bit",
    ) -> None:
        super().__init__()
        self.layout = check_layout("PackedTernaryLinear", layout)
        config = TernaryConfig(group_size=group_size, activations=activations, target=target)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.activations, self.original_dtype = config.group_size, activations, dtype
        self.group_code, self.quantize_activations = config.group_code, config.quantize_activations
        self.kernel = resolve_target(target)
        if layout == "1.6bit":  # bytes 0 are weights 0, as the 2-bit zeros below are not
            shape = packing_base3.packed_shape(out_features, in_features)
        else:
            shape = packed_shape(out_features, in_features)
        self.register_buffer("packed", torch.zeros(shape, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, num_groups(in_features, self.group_code)))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_codes(
        cls, codes: Tensor, scales: Tensor, bias: Tensor | None, config: TernaryConfig, dtype: torch.dtype,
        layout: str = "2bit",
    ) -> PackedTernaryLinear:
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, bias=bias is not None, group_size=config.group_size,
            activations=config.activations, dtype=dtype, target=config.target, layout=layout,
        )  # fmt: skip
        layer.packed = packing_base3.pack_codes(codes) if layout == "1.6bit" else pack_codes(codes)
        layer.scales = scales.float().contiguous()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "1.6bit":
            return self._forward_base3(x)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or self._bias_requires_grad())):
            return self._op(x)  # the op has the autograd formula (adapters trained on a packed base)
        prepared = self.__dict__.get("_prepared")
        if (
            prepared is not None
            and prepared.serves(x, self._buffers)
            and self.quantize_activations  # attributes a user may have changed since it was built
            and self.kernel == "cpu"
            and prepared.group_code == self.group_code
            and prepared.in_features == self.in_features
            and not torch.autograd._profiler_enabled()
        ):
            return prepared(x)  # the decode hot path: one C call
        if x.shape[-1] == self.in_features and x.is_floating_point():
            # Eager serving: call the kernel directly. The op's dispatch costs about as much as
            # a small decode GEMV itself; compiled graphs and export still see the op.
            if torch.autograd._profiler_enabled():  # keep the layer visible to torch.profiler
                with torch.profiler.record_function("bitcpm::ternary_linear_packed"):
                    return self._eager_forward(x)
            return self._eager_forward(x)
        return self._op(x)

    def _forward_base3(self, x: Tensor) -> Tensor:
        """The 1.6-bit layer: its own kernels in eager CPU calls, the 2-bit op elsewhere."""
        if (
            torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or self._bias_requires_grad()))
            or x.shape[-1] != self.in_features
            or not x.is_floating_point()
        ):
            return self._op(x)
        prepared = self.__dict__.get("_prepared")
        if (
            prepared is not None
            and prepared.serves(x, self._buffers)
            and self.quantize_activations
            and self.kernel == "cpu"
            and prepared.group_code == self.group_code
            and prepared.in_features == self.in_features
            and prepared.layout == "1.6bit"
        ):
            return prepared(x)  # the decode hot path: one C call
        if self.kernel != "cpu":  # other targets have 2-bit kernels only
            x2d = x.reshape(-1, self.in_features)
            y = get_kernel(self.kernel).packed_linear(
                x2d, self.packed_2bit(), self.scales, self.in_features, self.group_code, self.bias,
                self.quantize_activations, x.dtype,
            )  # fmt: skip
            return y.reshape(*x.shape[:-1], self.out_features)
        from bitcompile.kernels import cpu

        if (
            self.quantize_activations and cpu.available() and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16)
            and self.packed.is_cpu and cpu.can_prepare(self.packed, self.scales, self.bias)
        ):  # fmt: skip
            prepared = cpu.PreparedPackedLinear(
                self.packed, self.scales, self.in_features, self.group_code, self.bias, layout="1.6bit"
            )
            self.__dict__["_prepared"] = prepared
            return prepared(x)
        from bitcompile.kernels.cpu.base3 import packed_linear_base3

        y = packed_linear_base3(
            x.reshape(-1, self.in_features), self.packed, self.scales, self.in_features, self.group_code, self.bias,
            self.quantize_activations, x.dtype,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_layout(self, layout: str) -> PackedTernaryLinear:
        """A new layer with the same codes, scales and bias stored in ``layout`` (self when it already is)."""
        check_layout("PackedTernaryLinear.to_layout", layout)
        if layout == self.layout:
            return self
        layer = PackedTernaryLinear(
            self.in_features, self.out_features, bias=self.bias is not None, group_size=self.group_size,
            activations=self.activations, dtype=self.original_dtype, target="auto", layout=layout,
        )  # fmt: skip
        layer.kernel = self.kernel
        codes = self.codes()
        layer.packed = packing_base3.pack_codes(codes) if layout == "1.6bit" else pack_codes(codes)
        layer.scales = self.scales.clone()
        if self.bias is not None:
            layer.bias = self.bias.detach().clone()
        return layer.to(self.packed.device)

    def packed_2bit(self) -> Tensor:
        """``packed`` in the canonical 2-bit layout (the buffer itself for a 2-bit layer; a new
        tensor, made on each call, for a 1.6-bit one)."""
        if self.layout == "2bit":
            return self.packed
        if torch.compiler.is_compiling():
            global _warned_compiled_base3
            if not _warned_compiled_base3:
                _warned_compiled_base3 = True
                warnings.warn(
                    "a 1.6-bit PackedTernaryLinear in a compiled graph is repacked to 2 bits on every call "
                    "(compiled graphs have 2-bit kernels only): same results, slower; for compiled serving "
                    "pack(layout='2bit') or layer.to_layout('2bit')",
                    BitcompileWarning,
                    stacklevel=2,
                )
            # NOTE: data-dependent checks inside; the compiled graph takes the 2-bit bytes as an
            # input (disable() is applied here, not at import: it loads Dynamo)
            return torch.compiler.disable(_repack_2bit)(self.packed, self.in_features)
        return _repack_2bit(self.packed, self.in_features)

    def _bias_requires_grad(self) -> bool:
        bias = self._buffers["bias"]
        return bias is not None and bias.requires_grad

    def _op(self, x: Tensor) -> Tensor:
        return torch.ops.bitcpm.ternary_linear_packed(
            x, self.packed_2bit(), self.scales, self.bias, self.in_features, self.group_code,
            self.quantize_activations, self.kernel,
        )  # fmt: skip

    def _eager_forward(self, x: Tensor) -> Tensor:
        prepared = prepared_cpu_call(
            x, self.packed, self.scales, self.bias, self.in_features, self.group_code,
            self.quantize_activations, self.kernel,
        )  # fmt: skip
        if prepared is not None:
            self.__dict__["_prepared"] = prepared  # forward's hot path while it stays current
            return prepared(x)
        x2d = x.reshape(-1, self.in_features)
        y = get_kernel(self.kernel).packed_linear(
            x2d, self.packed, self.scales, self.in_features, self.group_code,
            self.bias, self.quantize_activations, x.dtype,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_prepared", None)  # ctypes pointers: neither picklable nor valid in a copy
        return state

    @property
    def weight(self) -> PackedWeightInfo:
        """``shape`` ``(out, in)``, ``dtype`` and ``device`` of the weight, as ``nn.Linear.weight`` has them
        (no float matrix is built: :class:`PackedWeightInfo`)."""
        return PackedWeightInfo((self.out_features, self.in_features), self.original_dtype, self.packed.device)

    def codes(self) -> Tensor:
        """The ternary codes as int8 ``(out, in)``."""
        if self.layout == "1.6bit":
            return packing_base3.unpack_codes(self.packed, self.in_features)
        return unpack_codes(self.packed, self.in_features)

    def dequantized_weight(self) -> Tensor:
        """``codes * scales`` as an fp32 ``(out, in)`` matrix (for checks and export)."""
        return get_kernel("reference").dequantize_weight(self.codes(), self.scales, self.group_code)

    def extra_repr(self) -> str:
        acts = "int8 activations" if self.quantize_activations else "weight-only"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{ScaleGroups.from_code(self.group_code).label} scales, {acts}, kernel={self.kernel}"
            + (f", layout={self.layout}" if self.layout != "2bit" else "")
        )


def _repack_2bit(packed: Tensor, in_features: int) -> Tensor:
    """1.6-bit bytes -> the canonical 2-bit bytes of the same codes."""
    return pack_codes(packing_base3.unpack_codes(packed, in_features))


def float_gemv_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot be served as a :class:`FloatGemvLinear` (None: it can): a plain
    fp32 CPU ``nn.Linear`` with rows contiguous in memory, and the C kernels built."""
    from bitcompile.kernels import cpu as cpu_kernels

    if type(module) not in (nn.Linear, FloatGemvLinear):
        return f"it is a {type(module).__name__}, not a plain nn.Linear"
    weight = module.weight
    if weight.dtype != torch.float32 or not weight.is_cpu:
        return f"its weight is {str(weight.dtype).removeprefix('torch.')} on {weight.device}, not fp32 on the CPU"
    if weight.stride(-1) != 1:
        return "its weight rows are not contiguous"
    if not cpu_kernels.available():
        return "bitcompile's C kernels are not built"
    return None


class FloatGemvLinear(nn.Linear):
    """An ``nn.Linear`` that :func:`pack` keeps in fp32 (the tied ``lm_head`` above all),
    served by bitcompile's multi-threaded fp32 GEMV when a no-grad CPU call has at most
    ``DENSE_MAX_M`` tokens, by ``F.linear`` otherwise (compiled graphs, training, prefill).

    Why: after packing, the tied head is the largest weight left, and torch's fp32 GEMV at
    M = 1 is single-threaded (docs/serving.md). ``pack``
    switches the class of a plain ``nn.Linear`` in place, so its parameters (tied ones stay
    tied), hooks and state_dict keys are untouched. Results agree with ``F.linear`` within
    fp32 rounding (another summation order), not bitwise.
    """

    computes_plain_linear = True  # policy.forward_override_reason: same result as nn.Linear.forward

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if not torch.is_grad_enabled() and x.is_cpu and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
                # one extern call (the GEMV at decode sizes); discovery treats it as F.linear
                return torch.ops.bitcpm.float_gemv_linear(x, self.weight, self.bias)
            return nn.functional.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:
            return nn.functional.linear(x, self.weight, self.bias)  # torch's own error
        # dense_linear picks the GEMV or F.linear (prefill sizes, autograd, other dtypes)
        if torch.autograd._profiler_enabled():  # visible to torch.profiler as one op
            with torch.profiler.record_function("bitcpm::float_gemv_linear"):
                return float_gemv(x, self.weight, self.bias)
        return float_gemv(x, self.weight, self.bias)
