"""C ternary kernels (bitcompile/kernels/cpu/) against tests/reference_impl.py and kernels/reference.py.

Every ISA path is forced with BITCOMPILE_ISA; shapes cover the GEMV (M <= 8) and GEMM
paths, N and K that are not multiples of 4/32/64/128/256, every group mode, bias or not,
fp32 and bf16 output. Integer sums must be exact; scaled outputs equal within fp32 rounding
(bit-equal to the reference kernel for per-row / per-tensor scales).
"""

from __future__ import annotations

import pytest
import torch

import reference_impl as ref
from bitcompile.kernels import cpu, packing, reference
from bitcompile.targets import get_kernel, resolve_target

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C kernels not built: {cpu.unavailable_reason()}")

ISAS = ["scalar", "avx2", "avx512", "avx512-nogfni"]  # the last: AVX-512 without the GFNI plane extraction
# group code as the kernels take it, and the same mode as tests/reference_impl spells it
GROUPS = [(-1, -1), (0, "tensor"), (32, 32), (64, 64), (128, 128), (96, 96), (48, 48), (100, 100)]
SHAPES = [  # (M, N, K): GEMV M <= 8, GEMM above
    (1, 1, 1),
    (1, 13, 100),
    (3, 5, 257),
    (8, 67, 600),
    (9, 6, 255),
    (37, 19, 1000),
    (130, 9, 513),
    # K around the v2 tail (full 256-k blocks, then 0..3 tail chunks of 64 k)
    (1, 5, 63),
    (2, 7, 64),
    (1, 9, 65),
    (4, 6, 320),
    (1, 11, 576),
    (12, 7, 577),
    (3, 5, 704),
    (20, 9, 960),
]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    name, _, variant = request.param.partition("-")
    if not cpu.isa_supported(name):
        pytest.skip(f"this CPU has no {name}")
    monkeypatch.setenv("BITCOMPILE_ISA", name)
    if variant == "nogfni":
        monkeypatch.setenv("BITCOMPILE_NO_GFNI", "1")
    assert cpu.isa() == name
    return name


def _problem(m, n, k, group_size, seed=0, x_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(x_dtype)
    b = torch.randn(n, generator=g)
    q, s = ref.ternary_codes(w, group_size)
    return x, w, b, q.to(torch.int8), s


def _tol(x_codes, x_scales, q, s, group_size):
    """fp32 rounding bound: a few ulps of sum_g s_g * sum_k |q x| (times s_x)."""
    mag = torch.zeros(x_codes.shape[0], q.shape[0], dtype=torch.float64)
    for gi, (a, b_) in enumerate(ref.group_bounds(q.shape[1], group_size)):
        mag += (x_codes[:, a:b_].abs().double() @ q[:, a:b_].abs().double().t()) * s[:, gi].double()
    return (mag * x_scales.double()[:, None] + 1) * 4e-7 * (1 + len(ref.group_bounds(q.shape[1], group_size)) ** 0.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", GROUPS)
def test_packed_linear_int8_matches_reference_impl(isa, shape, groups):
    code, group_size = groups
    m, n, k = shape
    x, w, b, q, s = _problem(m, n, k, group_size, seed=m * 1000 + k)
    packed = packing.pack_codes(q)
    expected = ref.ternary_linear_forward(x, w, b, group_size, "int8")
    got = cpu.packed_linear(x, packed, s, k, code, b, True, torch.float32)
    x_codes, x_scales = ref.activation_codes(x)
    tol = _tol(x_codes, x_scales, q, s, group_size)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - expected).abs() <= tol + 1e-6).all()
    # the same through the int8-codes entry point, against the package's reference kernel
    xq, sx = reference.quantize_activations(x)
    want = reference.packed_int8_matmul(xq, sx, packed, s, k, code, b, torch.float32)
    got2 = cpu.packed_int8_matmul(xq, sx, packed, s, k, code, b, torch.float32)
    assert torch.equal(got2, got)
    if code <= 0:  # one scale column: bit-identical to the reference (same order of roundings)
        assert torch.equal(got2, want)
    else:
        assert ((got2.double() - want.double()).abs() <= tol + 1e-6).all()


@pytest.mark.parametrize("n,k", [(24, 1), (1, 24), (1, 1)])
def test_training_path_with_one_input_or_output_feature(n, k):
    """torch 2.13's CPU _int_mm returns garbage for K = 1: the training forward (K = in_features)
    and the int8 grad_input (whose sum runs over N = out_features) must not."""
    x, _, b, q, s = _problem(6, n, k, -1, seed=k)
    xq, sx = reference.quantize_activations(x)
    want = reference.int8_ternary_matmul(xq, sx, q, s, -1, b, torch.float32)
    assert torch.equal(cpu.int8_ternary_matmul(xq, sx, q, s, -1, b, torch.float32), want)
    grad = torch.randn(6, n, generator=torch.Generator().manual_seed(n))
    got, _, _ = cpu.ternary_linear_backward(grad, xq, sx, q, s, -1, True, False, False, precision="int8")
    q_g, s_g = ref.activation_codes(grad * s[:, 0])
    assert torch.equal(got, (q_g @ q.long()).float() * s_g[:, None])


@pytest.mark.parametrize("shape", [(5, 67, 600), (9, 130, 257), (3, 70, 63), (4, 64, 1)])
@pytest.mark.parametrize("groups", [(-1, -1), (0, "tensor")])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_large_m_path_decodes_tiles_for_int_mm_bit_identically(isa, monkeypatch, shape, groups, out_dtype):
    """From cpu.ONEDNN_MIN_TOKENS on, per-row / per-tensor packed layers decode 2-bit tiles into
    int8 and run torch._int_mm: forced here at small M, with tiles of 64 rows (the last one
    partial), the result must equal the packed kernel's and the reference's bit for bit."""
    code, group_size = groups
    m, n, k = shape
    x, _, b, q, s = _problem(m, n, k, group_size, seed=n + k)
    packed = packing.pack_codes(q)
    xq, sx = reference.quantize_activations(x)
    want_float = cpu.packed_linear(x, packed, s, k, code, b, True, out_dtype)  # the VNNI kernel
    want_codes = reference.packed_int8_matmul(xq, sx, packed, s, k, code, b, out_dtype)
    monkeypatch.setattr(cpu.gemm, "ONEDNN_MIN_TOKENS", 1)
    monkeypatch.setattr(cpu.gemm, "DECODE_TILE_ROWS", 64)
    got_float = cpu.packed_linear(x, packed, s, k, code, b, True, out_dtype)
    got_codes = cpu.packed_int8_matmul(xq, sx, packed, s, k, code, b, out_dtype)
    got_prepared = cpu.PreparedPackedLinear(packed, s, k, code, b)(x.reshape(1, m, k), out_dtype)  # model layers
    assert got_float.dtype == out_dtype and got_float.shape == (m, n)
    assert torch.equal(got_float, want_float)
    assert torch.equal(got_codes, want_codes)
    assert torch.equal(got_prepared, want_float.reshape(1, m, n))


@pytest.mark.parametrize("shape", [(1, 7, 300), (6, 33, 1000), (21, 10, 777), (2, 9, 576), (5, 8, 960)])
@pytest.mark.parametrize("groups", GROUPS)
def test_integer_sums_are_exact(isa, shape, groups):
    """With unit scales the outputs are the integer dot products themselves (exact in fp32 < 2**24)."""
    code, group_size = groups
    m, n, k = shape
    g = torch.Generator().manual_seed(k)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ng = len(ref.group_bounds(k, group_size))
    exact = (xq.long() @ q.long().t()).float()
    got = cpu.packed_int8_matmul(xq, torch.ones(m), packing.pack_codes(q), torch.ones(n, ng), k, code, None, torch.float32)
    assert torch.equal(got, exact)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_out_and_bf16_activations(isa, groups, x_dtype):
    code, group_size = groups
    x, w, b, q, s = _problem(5, 40, 700, group_size, seed=7, x_dtype=x_dtype)
    packed = packing.pack_codes(q)
    got = cpu.packed_linear(x, packed, s, 700, code, b, True, torch.bfloat16)
    want = reference.packed_linear(x, packed, s, 700, code, b, True, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    if code <= 0:
        assert torch.equal(got, want)
    else:  # fp32 values agree to rounding; after bf16 rounding at most one bf16 ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [(-1, -1), (0, "tensor"), (64, 64), (32, 32), (48, 48), (100, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_float_matmul_matches_reference_impl(isa, shape, groups, with_bias):
    code, group_size = groups
    m, n, k = shape
    x, w, b, q, s = _problem(m, n, k, group_size, seed=k + 5)
    b = b if with_bias else None
    expected = ref.ternary_linear_forward(x, w, b, group_size, None)
    got = cpu.packed_float_matmul(x, packing.pack_codes(q), s, k, code, b, torch.float32)
    mag = x.abs().double() @ (q.abs().double() * ref.fake_quant_weight(w, group_size).abs().double()).t()
    assert ((got.double() - expected).abs() <= mag * 2e-6 + 1e-5).all()
    got_bf16 = cpu.packed_float_matmul(x.bfloat16(), packing.pack_codes(q), s, k, code, b, torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 15, 16, 100, 1000])
def test_quantize_activations_bit_exact(isa, x_dtype, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(6, k, generator=g) * torch.tensor([1.0, 1e-3, 100.0, 0.0, 1e-7, 3.0])[:, None]
    x[5, : min(k, 4)] = torch.tensor([127.0, 0.5, 1.5, -2.5])[: min(k, 4)] * 3 / 127  # ties -> even
    x = x.to(x_dtype)
    codes, scales = cpu.quantize_activations(x)
    want_codes, want_scales = ref.activation_codes(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert torch.equal(scales, want_scales)
    assert torch.equal(codes.long(), want_codes)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 15, 100])
def test_quantize_activations_with_column_scale_bit_exact(isa, x_dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(5, k, generator=g) * torch.tensor([1.0, 1e-3, 100.0, 0.0, 3.0])[:, None]).to(x_dtype)
    col = torch.rand(k, generator=g) + 0.01
    codes, scales = cpu.quantize_activations(x, col_scale=col)
    want_codes, want_scales = ref.activation_codes(x.float() * col)  # the product formed first
    assert torch.equal(scales, want_scales) and torch.equal(codes.long(), want_codes)


@pytest.mark.parametrize("code,spelled", [(-1, -1), (0, "tensor")])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 8), (17, 100), (64, 1000)])
def test_quantize_weight_bit_exact_including_ties(isa, code, spelled, n, k):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    if k == 8:  # mean |w| = 2 exactly, so w / s hits the rounding ties +-0.5 and +-1.5
        w = torch.tensor([1.0, -1.0, 3.0, -3.0, 2.0, 2.0, 4.0, 0.0]).repeat(n, 1)
    w_before = w.clone()
    codes, scales = cpu.quantize_weight(w, code)
    want_codes, want_scales = ref.ternary_codes(w, spelled)
    assert codes.dtype == torch.int8 and torch.equal(scales, want_scales)
    assert torch.equal(codes.long(), want_codes)
    assert torch.equal(w, w_before)
    if k == 8 and code < 0:
        assert codes[0].tolist() == [0, 0, 1, -1, 1, 1, 1, 0]


def _special_values(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if dtype in (torch.int8, torch.int32):
        lim = 127 if dtype == torch.int8 else 1 << 30
        return torch.randint(-lim, lim + 1, shape, generator=g, dtype=torch.int64).to(dtype)
    flat = x.view(-1)
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.3e38, -1.5e-39, 65504.0]
    flat[: min(len(specials), flat.numel())] = torch.tensor(specials[: flat.numel()])
    return x.to(dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.int32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factors", ["none", "row", "col+row+bias", "row+scalar", "all"])
def test_scale_rows_equals_the_torch_expression(isa, x_dtype, out_dtype, factors):
    m, n = 7, 45
    x = _special_values((m, n), x_dtype, seed=len(factors))
    g = torch.Generator().manual_seed(1)
    row = torch.rand(m, generator=g) * 4 if "row" in factors or factors == "all" else None
    col = torch.rand(n, generator=g) * 2 if "col" in factors or factors == "all" else None
    bias = torch.randn(n, generator=g) if "bias" in factors or factors == "all" else None
    scalar = 0.37 if "scalar" in factors or factors == "all" else 1.0
    want = x.float()
    if col is not None:
        want = want * col
    if row is not None:
        want = want * row[:, None]
    want = want * scalar
    if bias is not None:
        want = want + bias
    got = cpu.scale_rows(x, row=row, col=col, scalar=scalar, bias=bias, out_dtype=out_dtype)
    want = want.to(out_dtype)
    assert got.dtype == out_dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)  # NaN payloads differ even within torch; NaN-ness may not
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])  # bit for bit, -0.0 included


def test_scale_rows_and_column_scaled_quantizer_refuse_wrong_lengths():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"row must hold 4 values"):
        cpu.scale_rows(x, row=torch.ones(1))
    with pytest.raises(ValueError, match=r"col must hold 6 values"):
        cpu.scale_rows(x, col=torch.ones(5))
    with pytest.raises(ValueError, match=r"bias must hold 6 values"):
        cpu.scale_rows(x, bias=torch.ones(4, 6))
    with pytest.raises(ValueError, match=r"col must hold 6 values"):
        cpu.quantize_activations(x, col_scale=torch.ones(1))


def test_scale_rows_reads_strided_rows(isa):
    x = torch.randn(6, 40)[:, 3:30]  # row stride 40, 27 columns
    row = torch.rand(6)
    assert torch.equal(cpu.scale_rows(x, row=row), x * row[:, None])


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("m", [1, 20])
def test_training_int8_ternary_matmul(isa, groups, m):
    code, group_size = groups
    x, w, b, q, s = _problem(m, 24, 300, group_size, seed=m)
    xq, sx = reference.quantize_activations(x)
    want = reference.int8_ternary_matmul(xq, sx, q, s, code, b, torch.float32)
    got = cpu.int8_ternary_matmul(xq, sx, q, s, code, b, torch.float32)
    if code <= 0:  # torch._int_mm, then the reference's scalings: bit-identical
        assert torch.equal(got, want)
    else:
        tol = _tol(xq.long(), sx, q.long(), s, group_size)
        assert ((got.double() - want.double()).abs() <= tol + 1e-6).all()


@pytest.mark.parametrize("code", [-1, 64])
def test_threads_split_n_without_changing_results(code):
    x, w, b, q, s = _problem(5, 203, 1100, code, seed=11)
    packed = packing.pack_codes(q)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.packed_linear(x, packed, s, 1100, code, b, True, torch.float32)
        onef = cpu.packed_float_matmul(x, packed, s, 1100, code, b, torch.float32)
        torch.set_num_threads(2)
        two = cpu.packed_linear(x, packed, s, 1100, code, b, True, torch.float32)
        twof = cpu.packed_float_matmul(x, packed, s, 1100, code, b, torch.float32)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two) and torch.equal(onef, twof)


def test_ternary_linear_op_on_cpu_kernel_matches_reference_kernel():
    x, w, b, _, _ = _problem(7, 30, 260, -1, seed=2)
    for quant in (True, False):
        y_cpu = torch.ops.bitcpm.ternary_linear(x, w, b, -1, quant, "cpu")[0]
        y_ref = torch.ops.bitcpm.ternary_linear(x, w, b, -1, quant, "reference")[0]
        assert torch.equal(y_cpu, y_ref)


def test_cpu_is_registered_and_resolved():
    assert get_kernel("cpu") is cpu
    assert resolve_target("cpu") == "cpu" and resolve_target("auto") == "cpu"
    assert cpu.kernel_isa(-1) == cpu.isa()


def test_bad_inputs_raise_clear_errors():
    x, w, b, q, s = _problem(2, 5, 100, -1)
    packed = packing.pack_codes(q)
    xq, sx = reference.quantize_activations(x)
    with pytest.raises(ValueError, match="bytes per row, in_features=300 needs 80"):
        cpu.packed_int8_matmul(torch.zeros(2, 300, dtype=torch.int8), sx, packed, s, 300, -1, None, torch.float32)
    with pytest.raises(ValueError, match=r"w_scales must have shape \(5, 4\)"):
        cpu.packed_int8_matmul(xq, sx, packed, s, 100, 32, None, torch.float32)
    with pytest.raises(TypeError, match="x_codes must be int8"):
        cpu.packed_int8_matmul(x, sx, packed, s, 100, -1, None, torch.float32)
    with pytest.raises(ValueError, match=r"activations must be 2-D \(M, 100\)"):
        cpu.packed_linear(x[:, :50], packed, s, 100, -1, None, True, torch.float32)
    with pytest.raises(ValueError, match="bias shape"):
        cpu.packed_float_matmul(x, packed, s, 100, -1, torch.zeros(4), torch.float32)
    with pytest.raises(TypeError, match="2-D uint8"):
        cpu.packed_float_matmul(x, q, s, 100, -1, None, torch.float32)


def test_bad_isa_env_is_an_error(monkeypatch):
    monkeypatch.setenv("BITCOMPILE_ISA", "neon9")
    with pytest.raises(ValueError, match="BITCOMPILE_ISA='neon9' is not one of"):
        cpu.isa()


def test_degenerate_shapes():
    packed = packing.pack_codes(torch.zeros(3, 0, dtype=torch.int8))
    y = cpu.packed_linear(torch.zeros(2, 0), packed, torch.ones(3, 1), 0, -1, torch.ones(3), True, torch.float32)
    assert torch.equal(y, torch.ones(2, 3))
    packed = packing.pack_codes(torch.zeros(3, 10, dtype=torch.int8))
    assert cpu.packed_linear(torch.zeros(0, 10), packed, torch.ones(3, 1), 10, -1, None, True, torch.float32).shape == (0, 3)


def test_without_the_library_everything_falls_back_to_reference(monkeypatch):
    x, w, b, q, s = _problem(3, 9, 300, 64, seed=1)
    packed = packing.pack_codes(q)
    monkeypatch.setattr(cpu.library, "LIB", None)
    monkeypatch.setattr(cpu.library, "UNAVAILABLE_REASON", "test: simulated missing library")
    assert not cpu.available()
    assert resolve_target("auto") == "reference"
    want = reference.packed_linear(x, packed, s, 300, 64, b, True, torch.float32)
    assert torch.equal(cpu.packed_linear(x, packed, s, 300, 64, b, True, torch.float32), want)
    assert torch.equal(cpu.pack_codes(q), packed)


# ---- non-finite activations: a token with a NaN or inf gives NaN outputs, on every ISA ----

NAN, INF = float("nan"), float("inf")
NON_FINITE = {"nan": [NAN], "inf": [INF], "-inf": [-INF], "-inf,inf": [-INF, INF], "inf,nan": [INF, NAN]}


def _with_non_finite(m, k, values, x_dtype=torch.float32, seed=0):
    """Random (m, k) activations; row 0 (and the last row, if m > 2) hold ``values`` among finite ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0, k // 3 : k // 3 + len(values)] = torch.tensor(values)
    if m > 2:
        x[m - 1, k - 1] = values[-1]
    return x.to(x_dtype), ~torch.isfinite(x).all(dim=1)


def _assert_nan_rows(got, bad_rows, finite_rows_alone):
    """Every output of a token with a NaN / inf activation is NaN (DESIGN.md §3 in IEEE
    arithmetic: s_x is NaN or inf, x / s_x has a NaN, so has every dot product); the other
    tokens give what they give without that token (within fp32 rounding: the grouped kernels'
    tiles depend on M)."""
    assert torch.isnan(got[bad_rows]).all()
    want = finite_rows_alone(~bad_rows) if (~bad_rows).any() else got[~bad_rows]
    torch.testing.assert_close(got[~bad_rows], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("values", list(NON_FINITE.values()), ids=list(NON_FINITE))
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("groups", [(-1, -1), (0, "tensor"), (64, 64), (48, 48)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_non_finite_activations_give_nan_rows_on_every_isa(isa, monkeypatch, values, m, groups, x_dtype):
    """Regression: the AVX2 / AVX-512 absmax (vmaxps) dropped a NaN, and inf / inf codes were
    whatever NaN converts to, so these tokens came out finite or +-inf on some ISAs."""
    code, group_size = groups
    n, k = 9, 200
    x, bad = _with_non_finite(m, k, values, x_dtype, seed=m)
    _, _, b, q, s = _problem(1, n, k, group_size, seed=5)
    packed = packing.pack_codes(q)

    codes, scales = cpu.quantize_activations(x)  # the C activation quantizer
    want_codes, want_scales = reference.quantize_activations(x)
    assert torch.equal(codes, want_codes) and not codes[bad].any()
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(scales[bad]).any()

    def packed_linear(rows, out_dtype=torch.float32):
        return cpu.packed_linear(x[rows], packed, s, k, code, b, True, out_dtype)

    for out_dtype in (torch.float32, torch.bfloat16):
        _assert_nan_rows(packed_linear(slice(None), out_dtype), bad, lambda rows: packed_linear(rows, out_dtype))
        from_codes = cpu.packed_int8_matmul(codes, scales, packed, s, k, code, b, out_dtype)
        _assert_nan_rows(from_codes, bad, lambda rows: packed_linear(rows, out_dtype))
        prepared = cpu.PreparedPackedLinear(packed, s, k, code, b)(x, out_dtype)  # the model layers' call
        _assert_nan_rows(prepared, bad, lambda rows: packed_linear(rows, out_dtype))
    training = cpu.int8_ternary_matmul(codes, scales, q, s, code, b, torch.float32)  # the QAT forward
    want = reference.int8_ternary_matmul(want_codes, want_scales, q, s, code, b, torch.float32)
    assert torch.isnan(want[bad]).all()
    _assert_nan_rows(training, bad, lambda rows: want[rows])

    # weight-only: x * 0 is NaN for a NaN or inf x: the same NaN / inf pattern as the reference's matmul
    got = cpu.packed_float_matmul(x, packed, s, k, code, b, torch.float32)
    want = reference.packed_float_matmul(x, packed, s, k, code, b, torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)])  # the same signs
    assert torch.isnan(got[bad]).any() and torch.isfinite(got[~bad]).all()

    if code <= 0:  # from ONEDNN_MIN_TOKENS on: decoded tiles x torch._int_mm (forced here at small M)
        monkeypatch.setattr(cpu.gemm, "ONEDNN_MIN_TOKENS", 1)
        monkeypatch.setattr(cpu.gemm, "DECODE_TILE_ROWS", 4)
        _assert_nan_rows(packed_linear(slice(None)), bad, packed_linear)
        prepared = cpu.PreparedPackedLinear(packed, s, k, code, b)(x, torch.float32)
        _assert_nan_rows(prepared, bad, packed_linear)


@pytest.mark.parametrize("values", list(NON_FINITE.values()), ids=list(NON_FINITE))
def test_non_finite_activations_in_the_int8_head_kernel(isa, values):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(40, 130, generator=g), torch.randn(40, generator=g)
    codes, scales = reference.quantize_rows_int8(w)
    x, bad = _with_non_finite(5, 130, values)
    got = cpu.int8_dense_linear(x, codes, scales, b, torch.float32)
    _assert_nan_rows(got, bad, lambda rows: cpu.int8_dense_linear(x[rows], codes, scales, b, torch.float32))
    want = reference.int8_dense_linear(x, codes, scales, b, torch.float32)
    assert torch.isnan(want[bad]).all() and torch.equal(got[~bad], want[~bad])
