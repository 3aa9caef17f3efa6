"""Every registered target's kernels through the same contract tests against ``kernels/reference``.

Parametrized over the target registry (:mod:`bitcompile.targets`), so a newly registered target
is tested here without touching this file. ``VARIANTS`` runs a target several ways where it has
them (the cpu kernels on each ISA this machine has; a target not listed runs once as it comes),
``TOLERANCE`` says how far a target may be from the reference (a target not listed must agree
within fp32 rounding). Covers every function of :class:`~bitcompile.kernels.contract.TernaryKernels`:
per-row / per-tensor / per-group scales, bias or not, int8 and weight-only, fp32 / bf16.
"""

from __future__ import annotations

import pytest
import torch

from bitcompile import targets
from bitcompile.kernels import packing, reference
from bitcompile.kernels.contract import KERNEL_FUNCTIONS, TernaryKernels

PER_ROW, PER_TENSOR = -1, 0
GROUPS = [PER_ROW, PER_TENSOR, 32, 64]
# (M, N, K) within every target's limits (the Ascend kernels want groups of 32): a GEMM, and a
# decode GEMV whose K is no multiple of the 2-bit layout's 64 (a padded tail) nor of the group
SHAPES = [(5, 48, 128), (1, 40, 160)]


def _cpu_isas() -> list[str]:
    from bitcompile.kernels import cpu

    if not cpu.available():
        return ["reference-fallback"]
    return [isa for isa in ("scalar", "avx2", "avx512") if cpu.isa_supported(isa)]


#: target name -> the ways to run it (each sets its environment in ``_use_variant``)
VARIANTS = {"cpu": _cpu_isas, "cann": lambda: ["emulator" if _cann_emulated() else "torch_npu"]}
#: target name -> (rtol, atol as a fraction of the reference output's largest magnitude)
TOLERANCE = {
    "reference": (0.0, 0.0),
    # the Ascend kernels compute in bf16, and npu_dynamic_quant's codes can differ by one (docs/cann.md)
    "cann": (2e-2, 2e-2),
}
DEFAULT_TOLERANCE = (1e-5, 1e-5)
#: target name -> how far its activation codes may be from the reference's (default: equal)
ACTIVATION_CODE_STEP = {"cann": 1}


def _cann_emulated() -> bool:
    from bitcompile.kernels import npu_ops

    return npu_ops.ensure_npu_ops() == "emulator"


def _implementations() -> list:
    params = []
    for target in targets.targets():
        variants = VARIANTS.get(target.name, lambda: ["default"])()
        params += [pytest.param((target.name, v), id=f"{target.name}-{v}") for v in variants]
    return params


@pytest.fixture(params=_implementations())
def kernels(request, monkeypatch) -> tuple[str, TernaryKernels]:
    name, variant = request.param
    if name == "cpu" and variant != "reference-fallback":
        monkeypatch.setenv("BITCOMPILE_ISA", variant)
    return name, targets.get_kernel(name)


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    rtol, atol = TOLERANCE.get(name, DEFAULT_TOLERANCE)
    if rtol == atol == 0.0:
        assert torch.equal(got, want)
        return
    scale = want.float().abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * max(scale, 1e-6))


def _problem(group_code: int, seed: int = 0, x_dtype: torch.dtype = torch.float32, shape=SHAPES[0]):
    m, n, k = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = (torch.randn(m, k, generator=g) * 3).to(x_dtype)
    bias = torch.randn(n, generator=g)
    codes, scales = reference.quantize_weight(w, group_code)
    return x, w, bias, codes, scales


def test_every_target_implements_the_contract():
    for target in targets.targets():
        impl = target.kernels()
        assert isinstance(impl, TernaryKernels), target.name
        assert all(callable(getattr(impl, f)) for f in KERNEL_FUNCTIONS)
        assert "fp32" in impl.BACKWARD_PRECISIONS


@pytest.mark.parametrize("group_code", GROUPS)
def test_quantize_weight(kernels, group_code):
    name, impl = kernels
    _, w, _, want_codes, want_scales = _problem(group_code)
    codes, scales = impl.quantize_weight(w, group_code)
    assert torch.equal(codes.to(torch.int8), want_codes.to(torch.int8))
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0)
    want = reference.dequantize_weight(codes, scales, group_code)
    _close(name, impl.dequantize_weight(codes, scales, group_code), want)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_quantize_activations(kernels, x_dtype):
    name, impl = kernels
    x = _problem(PER_ROW, seed=1, x_dtype=x_dtype)[0]
    codes, scales = impl.quantize_activations(x)
    want_codes, want_scales = reference.quantize_activations(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.shape == x.shape[:1]
    assert (codes.int() - want_codes.int()).abs().max() <= ACTIVATION_CODE_STEP.get(name, 0)
    _close(name, scales, want_scales)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_code", GROUPS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_and_weight_only_forward(kernels, shape, group_code, with_bias, out_dtype):
    name, impl = kernels
    x, _, bias, codes, scales = _problem(group_code, seed=2, shape=shape)
    bias = bias if with_bias else None
    x_codes, x_scales = reference.quantize_activations(x)
    got = impl.int8_ternary_matmul(x_codes, x_scales, codes, scales, group_code, bias, out_dtype)
    _close(name, got, reference.int8_ternary_matmul(x_codes, x_scales, codes, scales, group_code, bias, out_dtype))
    got = impl.float_ternary_matmul(x, codes, scales, group_code, bias, out_dtype)
    _close(name, got, reference.float_ternary_matmul(x, codes, scales, group_code, bias, out_dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("group_code", GROUPS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_packed_serving(kernels, shape, group_code, with_bias, x_dtype):
    name, impl = kernels
    x, _, bias, codes, scales = _problem(group_code, seed=3, x_dtype=x_dtype, shape=shape)
    in_features = shape[2]
    bias = bias if with_bias else None
    packed = packing.pack_codes(codes.to(torch.int8))
    x_codes, x_scales = reference.quantize_activations(x)
    args = (packed, scales, in_features, group_code, bias)
    _close(name, impl.packed_int8_matmul(x_codes, x_scales, *args, x_dtype),
           reference.packed_int8_matmul(x_codes, x_scales, *args, x_dtype))  # fmt: skip
    _close(name, impl.packed_float_matmul(x, *args, x_dtype), reference.packed_float_matmul(x, *args, x_dtype))
    for quantize in (True, False):
        _close(name, impl.packed_linear(x, *args, quantize, x_dtype),
               reference.packed_linear(x, *args, quantize, x_dtype))  # fmt: skip


@pytest.mark.parametrize("group_code", GROUPS)
@pytest.mark.parametrize("int8_activations", [True, False])
def test_backward(kernels, group_code, int8_activations):
    name, impl = kernels
    x, _, _, codes, scales = _problem(group_code, seed=4)
    grad_out = torch.randn(x.shape[0], codes.shape[0], generator=torch.Generator().manual_seed(5))
    saved_x, x_scales = reference.quantize_activations(x) if int8_activations else (x, None)
    for needs in ((True, True, True), (True, False, False), (False, True, False)):
        args = (grad_out, saved_x, x_scales, codes, scales, group_code, *needs)
        for precision in impl.BACKWARD_PRECISIONS:
            kwargs = {} if precision == "fp32" else {"precision": precision}
            got = impl.ternary_linear_backward(*args, **kwargs)
            want = reference.ternary_linear_backward(*args)
            for g, w in zip(got, want):
                assert (g is None) == (w is None)
                if g is None:
                    continue
                if precision == "fp32":
                    _close(name, g.float(), w)
                else:  # bf16 GEMMs (docs/kernels.md "Training" measures this error)
                    torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())
