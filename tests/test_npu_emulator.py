"""The CPU emulator of the torch_npu 2.14 operators bitcompile emits (issue 6).

Numerics are checked against tests/reference_impl.py (DESIGN.md §3 written independently)
and against bit patterns worked out by hand from the documented encodings; error cases are
checked both eagerly and under FakeTensorMode (what torch.compile sees).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import reference_impl as ref
from bitcompile.kernels import npu_emulator as emu
from bitcompile.kernels import reference as kref

PROVIDER = emu.ensure_npu_ops()
npu = torch.ops.npu

# The schemas as documented in the shared notes (reference/cann_npu.md §1), copied by hand.
DOCUMENTED = {
    "npu_quant_matmul": "npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
    "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, "
    "int? x2_dtype=None, int? pertoken_scale_dtype=None, int? scale_dtype=None, "
    "int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor",
    "npu_weight_quant_batchmatmul": "npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
    "Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, "
    "int antiquant_group_size=0, int inner_precise=0, int? weight_dtype=None) -> Tensor",
    "npu_dynamic_quant": "npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
    'int? dst_type=None, str quant_mode="pertoken", float dst_type_max=0.0) -> (Tensor, Tensor)',
    "npu_trans_quant_param": "npu_trans_quant_param(Tensor scale, Tensor? offset=None, int? round_mode=0) -> Tensor",
    "npu_convert_weight_to_int4pack": "npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor",
    "npu_format_cast": "npu_format_cast(Tensor self, int acl_format, *, int? customize_dtype=None, "
    "int? input_dtype=None) -> Tensor",
}


def _ternary(n, k, group_size, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = ref.ternary_codes(w, group_size)
    return w.to(dtype), q.to(torch.int8), s


def _both_modes(fn):
    """Run ``fn`` eagerly and on fake tensors; both must raise the same error type and text."""
    errors = []
    for fake in (False, True):
        with pytest.raises((RuntimeError, NotImplementedError)) as info:
            if fake:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    fn()
            else:
                fn()
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])
    return str(errors[0])


def test_emulator_is_the_provider_here():
    assert PROVIDER == "emulator"  # torch_npu cannot be installed on these machines
    assert "torch_npu" not in sys.modules


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_schema_strings_match_documented(name):
    schema = getattr(npu, name).default._schema
    # compare parsed forms (torch prints the default 0.0 as "0.")
    assert str(schema) == str(torch._C.parse_schema("npu::" + DOCUMENTED[name]))
    assert emu.SCHEMAS[name] == DOCUMENTED[name]


def test_dtype_arguments_accept_dtype_and_enum():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    q, s = npu.npu_dynamic_quant(x)
    w = torch.randint(-1, 2, (32, 16), dtype=torch.int8)
    ws = torch.rand(16) + 0.5
    a = npu.npu_quant_matmul(q, w, ws, pertoken_scale=s, output_dtype=torch.bfloat16)
    b = npu.npu_quant_matmul(q, w, ws, pertoken_scale=s, output_dtype=15)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    q8a, _ = npu.npu_dynamic_quant(x, dst_type=torch.int8)
    q8b, _ = npu.npu_dynamic_quant(x, dst_type=1)
    assert torch.equal(q8a, q8b) and torch.equal(q8a, q)
    assert emu.as_dtype(15, "d") is torch.bfloat16 and emu.as_dtype(torch.float16, "d") is torch.float16
    with pytest.raises(NotImplementedError, match="int4"):
        emu.as_dtype(285, "output_dtype")


def _hardware_dynamic_quant(x, qmax=127.0, scale_form="times_inverse"):
    """ops-nn dynamic_quant kernels, written out: q = 127/max (fp32), codes = rint(x * q), scale per kernel variant."""
    x = x.float()
    rowmax = x.abs().amax(-1)
    q = torch.full_like(rowmax, qmax) / rowmax
    codes = torch.round(torch.nan_to_num(x * q[..., None], nan=0.0)).clamp(-qmax - 1, qmax)
    scale = 1 / q if scale_form == "reciprocal" else rowmax * torch.tensor(1 / qmax, dtype=torch.float32)
    return codes, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 96), (1, 1)])
@pytest.mark.parametrize("scale_form", emu.DYNAMIC_QUANT_SCALE_FORMS)
def test_dynamic_quant_follows_the_hardware_formula(dtype, shape, scale_form):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    with emu.emulate(dynamic_quant_scale=scale_form):
        q, s = npu.npu_dynamic_quant(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    codes, scales = _hardware_dynamic_quant(x, scale_form=scale_form)
    assert torch.equal(q.float(), codes) and torch.equal(s, scales)


def test_dynamic_quant_differs_from_the_reference_by_one_code_at_most():
    """x * (127/max) vs the reference's x / (max/127): rare one-code flips, 1-ulp scale differences."""
    x = torch.randn(2000, 512, generator=torch.Generator().manual_seed(11)).bfloat16()
    q, s = npu.npu_dynamic_quant(x)
    codes, scales = ref.activation_codes(x)
    diff = (q.long() - codes).abs()
    assert diff.max().item() == 1  # never more than one code
    flipped = (diff > 0).float().mean().item()
    assert 0 < flipped < 1e-3  # measured: 0.04 % of elements
    ulps = (s.view(torch.int32).long() - scales.float().view(torch.int32).long()).abs()
    assert ulps.max().item() <= 1 and (ulps > 0).any()


def test_dynamic_quant_zero_row_and_int4_output():
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    x[1, 3] = -2.0
    for form in emu.DYNAMIC_QUANT_SCALE_FORMS:
        with emu.emulate(dynamic_quant_scale=form):
            q, s = npu.npu_dynamic_quant(x)
        assert s[0].item() == 0.0 and torch.all(q[0] == 0)  # 127/0 = inf; the scale comes back 0, not 1
    assert q[1, 3].item() == -127
    q4, s4 = npu.npu_dynamic_quant(x, dst_type=torch.quint4x2)
    assert q4.dtype == torch.int32 and q4.shape == (2, 2)
    assert emu.unpack_int4(q4)[1, 3].item() == -7 and s4[1].item() == pytest.approx(2 / 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(5, 64, 48), (3, 37, 20), (1, 130, 7)])
@pytest.mark.parametrize("group_size", [-1, "tensor"])
def test_quant_matmul_per_row_a8_matches_reference(dtype, m, k, n, group_size):
    """npu_dynamic_quant + npu_quant_matmul == DESIGN §3 W1.58A8 up to the output's rounding."""
    w, q_w, s_w = _ternary(n, k, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    bias = torch.randn(n).to(dtype)
    q, s = npu.npu_dynamic_quant(x)
    scale = s_w[:1, 0] if group_size == "tensor" else s_w[:, 0]
    y = npu.npu_quant_matmul(q, q_w.t(), scale, pertoken_scale=s, bias=bias, output_dtype=dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = ref.ternary_linear_forward(x.float(), w.float(), bias.float(), group_size, "int8")
    tol = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -10
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # same order of fp32 operations as bitcompile's reference kernel: bitwise equal
    kernel = kref.int8_ternary_matmul(q, s, q_w, s_w, 0 if group_size == "tensor" else -1, bias, dtype)
    assert torch.equal(y, kernel)


def test_quant_matmul_integer_accumulation_is_exact():
    k = 4096  # every product is +-127*127: the fp32 sum would already be inexact past 2**24
    x = torch.full((2, k), 127, dtype=torch.int8)
    w = torch.full((k, 3), 127, dtype=torch.int8)
    out = npu.npu_quant_matmul(x, w, torch.ones(3), output_dtype=torch.int32)
    assert out.dtype == torch.int32 and torch.all(out == 127 * 127 * k)
    bias = torch.tensor([1, -2, 3], dtype=torch.int32)
    out = npu.npu_quant_matmul(x, w, torch.ones(3), bias=bias, output_dtype=torch.int32)
    assert out[0].tolist() == [127 * 127 * k + 1, 127 * 127 * k - 2, 127 * 127 * k + 3]


def test_quant_matmul_transposition_from_strides_and_batch():
    q_w = torch.randint(-1, 2, (24, 40), dtype=torch.int8)  # (N, K) as nn.Linear stores it
    x = torch.randint(-128, 128, (3, 6, 40), dtype=torch.int8)
    scale = torch.rand(24) + 0.5
    transposed = npu.npu_quant_matmul(x, q_w.t(), scale, output_dtype=torch.bfloat16)
    contiguous = npu.npu_quant_matmul(x, q_w.t().contiguous(), scale, output_dtype=torch.bfloat16)
    assert emu.is_transposed(q_w.t()) and not emu.is_transposed(q_w.t().contiguous())
    assert transposed.shape == (3, 6, 24) and torch.equal(transposed, contiguous)
    strided = torch.randint(-1, 2, (40, 48), dtype=torch.int8)[:, ::2]
    msg = _both_modes(lambda: npu.npu_quant_matmul(x, strided, scale, output_dtype=torch.bfloat16))
    assert "contiguous or a transpose" in msg


def test_quant_matmul_int4_inputs():
    a = torch.randint(-8, 8, (4, 64), dtype=torch.int32)
    b = torch.randint(-8, 8, (64, 16), dtype=torch.int32)
    x1 = npu.npu_convert_weight_to_int4pack(a)
    x2 = npu.npu_convert_weight_to_int4pack(b)
    out = npu.npu_quant_matmul(x1, x2, torch.ones(1), pertoken_scale=torch.ones(4), output_dtype=torch.float16)
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.double(), (a.double() @ b.double()).half().double())


def test_int4pack_order_and_round_trip():
    w = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8], [-1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    packed = npu.npu_convert_weight_to_int4pack(w)
    assert packed.dtype == torch.int32 and packed.shape == (2, 1)
    assert packed[0, 0].item() == 0x87654321 - (1 << 32)  # low nibble first; bit 31 is the sign
    assert packed[1, 0].item() == 0xF
    r = torch.randint(-8, 8, (9, 48), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(emu.unpack_int4(npu.npu_convert_weight_to_int4pack(r)).int(), r)
    # the kernel masks each value to its low nibble (& 0xF) without a range check: 9 packs as -7
    wrapped = npu.npu_convert_weight_to_int4pack(torch.tensor([[9, -9, 16, 0, 0, 0, 0, 0]], dtype=torch.int32))
    assert emu.unpack_int4(wrapped)[0, :3].tolist() == [-7, 7, 0]
    assert "divisible by 8" in _both_modes(lambda: npu.npu_convert_weight_to_int4pack(r[:, :12].contiguous()))


def _eager_error(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


def test_trans_quant_param_encoding_and_precision_loss():
    one = npu.npu_trans_quant_param(torch.tensor([1.0]))
    assert one.dtype == torch.int64 and one.item() == 0x3F800000 | (1 << 46)
    scales = torch.rand(10000, generator=torch.Generator().manual_seed(4)) * 1e-2 + 1e-6
    words = npu.npu_trans_quant_param(scales)
    decoded, offset = emu.decode_quant_param(words)
    rel = ((decoded.double() - scales.double()) / scales.double()).abs()
    assert torch.all(decoded <= scales) and torch.all(offset == 0)  # truncation, never rounding up
    assert rel.max().item() < 2 ** -10 and rel.max().item() > 2 ** -11  # FP19: 10 mantissa bits kept
    off = npu.npu_trans_quant_param(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([3.4, -300.0, 255.6]))
    _, decoded_off = emu.decode_quant_param(off)
    assert decoded_off.tolist() == [3.0, -256.0, 255.0]
    assert npu.npu_trans_quant_param(torch.rand(1, 6)).shape == (1, 6)
    assert "(1, ) and (1, n)" in _both_modes(lambda: npu.npu_trans_quant_param(torch.rand(2, 6)))
    assert "round_mode" in _both_modes(lambda: npu.npu_trans_quant_param(torch.rand(4), round_mode=2))


def _f32(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def test_trans_quant_param_round_mode_1_rounds_to_nearest_even_fp19():
    """trans_quant_param_v2.h CalQuantPreScaleValue: RINT into 10 mantissa bits, not truncation."""
    one = 0x3F800000
    cases = {
        one | 1 << 12: one,  # exactly half an FP19 ulp above 1.0, even -> down
        one | 1 << 12 | 1: one | 1 << 13,  # above half -> up
        one | 1 << 13 | 1 << 12: one | 2 << 13,  # half, odd -> up to even
        one | 0x7FE000 | 1 << 12: 0x40000000,  # mantissa carry -> exponent + 1 (2.0)
        0x00400000: 0,  # zero exponent (denormal) -> +0
    }
    scale = torch.tensor([_f32(bits) for bits in cases])
    words = npu.npu_trans_quant_param(scale, round_mode=1)
    decoded, _ = emu.decode_quant_param(words)
    assert [int(w) & 0xFFFFFFFF for w in words] == list(cases.values())
    assert torch.all((words >> 46) & 1 == 1)
    random = torch.rand(10000, generator=torch.Generator().manual_seed(4)) * 1e-2 + 1e-6
    decoded, _ = emu.decode_quant_param(npu.npu_trans_quant_param(random, round_mode=1))
    rel = ((decoded.double() - random.double()) / random.double()).abs()
    assert rel.max().item() <= 2**-11 and (decoded > random).any()  # half the truncation error, both ways


def test_fp16_output_uses_truncated_scale():
    """int64 scales and (in eager torch_npu) fp32 scales without pertoken go through FP19."""
    x = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    w = torch.randint(-1, 2, (64, 8), dtype=torch.int8)
    scale = torch.rand(8) * 1e-3 + 1e-4
    truncated, _ = emu.decode_quant_param(emu.encode_quant_param(scale))
    expected = ((x.double() @ w.double()).float() * truncated).half()
    via_int64 = npu.npu_quant_matmul(x, w, npu.npu_trans_quant_param(scale), output_dtype=torch.float16)
    via_fp32 = npu.npu_quant_matmul(x, w, scale, output_dtype=torch.float16)
    assert torch.equal(via_int64, expected) and torch.equal(via_fp32, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n,g", [(64, 16, 32), (80, 24, 32), (256, 40, 64), (96, 8, 0)])
@pytest.mark.parametrize("int4", [True, False])
def test_weight_quant_batchmatmul_per_group_matches_reference(dtype, k, n, g, int4):
    group_size = g if g else -1
    w, q_w, s_w = _ternary(n, k, group_size, seed=k + n)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(5)).to(dtype)
    bias = torch.randn(n)
    w_kn = q_w.t().contiguous()
    weight = npu.npu_convert_weight_to_int4pack(w_kn.int()) if int4 else w_kn
    scale = s_w.t().contiguous().to(dtype) if g else s_w[:, 0].to(dtype)
    y = npu.npu_weight_quant_batchmatmul(
        x, weight, scale, bias=bias.to(torch.float16 if dtype == torch.float16 else torch.float32), antiquant_group_size=g
    )
    assert y.dtype == dtype and y.shape == (5, n)
    expected = ref.ternary_linear_forward(x.float(), w.float(), bias.to(dtype).float(), group_size, None)
    # scales are rounded to x's dtype (8 or 11 significant bits), then the output is rounded
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -9
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_weight_quant_batchmatmul_transposed_int8_weight():
    _, q_w, s_w = _ternary(16, 64, -1)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    a = npu.npu_weight_quant_batchmatmul(x, q_w.t(), s_w[:, 0].bfloat16())
    b = npu.npu_weight_quant_batchmatmul(x, q_w.t().contiguous(), s_w[:, 0].bfloat16())
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "case,match",
    [
        ("pertoken_2d", "pertoken_scale dim num must be 1"),
        ("k_too_large", "must not exceed 65535"),
        ("bf16_bias_fp16_out", "unsupported dtype combination"),
        ("pertoken_int8_out", "unsupported dtype combination"),
        ("scale_2d", "the scale dim num must be 1"),
        ("k_mismatch", "k dim of x1 and x2 need be same"),
        ("batch_broadcast", "broadcast"),
    ],
)
def test_quant_matmul_constraint_violations(case, match):
    q = torch.zeros(4, 32, dtype=torch.int8)
    w = torch.zeros(32, 8, dtype=torch.int8)
    s, ps = torch.ones(8), torch.ones(4)
    calls = {
        "pertoken_2d": lambda: npu.npu_quant_matmul(q, w, s, pertoken_scale=ps[:, None], output_dtype=15),
        "k_too_large": lambda: npu.npu_quant_matmul(
            torch.zeros(1, 65536, dtype=torch.int8), torch.zeros(65536, 8, dtype=torch.int8), s, output_dtype=15
        ),
        "bf16_bias_fp16_out": lambda: npu.npu_quant_matmul(
            q, w, s, pertoken_scale=ps, bias=torch.zeros(8, dtype=torch.bfloat16), output_dtype=torch.float16
        ),
        "pertoken_int8_out": lambda: npu.npu_quant_matmul(q, w, s, pertoken_scale=ps),
        "scale_2d": lambda: npu.npu_quant_matmul(q, w, s[None], output_dtype=15),
        "k_mismatch": lambda: npu.npu_quant_matmul(q, torch.zeros(31, 8, dtype=torch.int8), s, output_dtype=15),
        "batch_broadcast": lambda: npu.npu_quant_matmul(
            torch.zeros(2, 4, 32, dtype=torch.int8), torch.zeros(3, 32, 8, dtype=torch.int8), s, output_dtype=15
        ),
    }
    assert match in _both_modes(calls[case])


@pytest.mark.parametrize(
    "case,match",
    [
        ("x_3d", "x must be 2-D"),
        ("x_fp32", "x dtype must be float16 or bfloat16"),
        ("group_48", "multiple of 32"),
        ("group_shape", "per-group antiquant_scale must be"),
        ("scale_dtype", "must equal x dtype"),
        ("bias_bf16", "bias must be float32 for bfloat16 x"),
        ("n_too_large", "must lie in [1, 65535]"),
    ],
)
def test_weight_quant_batchmatmul_constraint_violations(case, match):
    x = torch.zeros(4, 96, dtype=torch.bfloat16)
    w = torch.zeros(96, 16, dtype=torch.int8)
    s = torch.ones(16, dtype=torch.bfloat16)
    calls = {
        "x_3d": lambda: npu.npu_weight_quant_batchmatmul(x[None], w, s),
        "x_fp32": lambda: npu.npu_weight_quant_batchmatmul(x.float(), w, s.float()),
        "group_48": lambda: npu.npu_weight_quant_batchmatmul(
            x, w, torch.ones(2, 16, dtype=torch.bfloat16), antiquant_group_size=48
        ),
        "group_shape": lambda: npu.npu_weight_quant_batchmatmul(
            x, w, torch.ones(2, 16, dtype=torch.bfloat16), antiquant_group_size=32
        ),
        "scale_dtype": lambda: npu.npu_weight_quant_batchmatmul(x, w, s.float()),
        "bias_bf16": lambda: npu.npu_weight_quant_batchmatmul(x, w, s, bias=torch.zeros(16, dtype=torch.bfloat16)),
        "n_too_large": lambda: npu.npu_weight_quant_batchmatmul(
            x, torch.zeros(96, 65536, dtype=torch.int8), torch.ones(65536, dtype=torch.bfloat16)
        ),
    }
    assert match in _both_modes(calls[case])


def test_dynamic_quant_constraint_violations():
    assert "float16 or bfloat16" in _both_modes(lambda: npu.npu_dynamic_quant(torch.zeros(2, 8)))
    assert "divisible by 8" in _both_modes(
        lambda: npu.npu_dynamic_quant(torch.zeros(2, 12, dtype=torch.float16), dst_type=torch.quint4x2)
    )
    assert "not modelled" in _both_modes(
        lambda: npu.npu_dynamic_quant(torch.zeros(2, 8, dtype=torch.float16), quant_mode="pertensor")
    )
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert "smooth_scales dtype torch.float32 must equal input dtype" in _both_modes(
        lambda: npu.npu_dynamic_quant(x, smooth_scales=torch.ones(8))
    )  # aclnnDynamicQuant.md: smoothScales "数据类型要和x保持一致"
    q, _ = npu.npu_dynamic_quant(x, smooth_scales=torch.full((8,), 2.0, dtype=torch.bfloat16))
    assert torch.equal(q, npu.npu_dynamic_quant(x * 2)[0])


def test_format_cast_preserves_values():
    w = torch.randint(-1, 2, (64, 32), dtype=torch.int8)
    nz = npu.npu_format_cast(w, emu.ACL_FORMAT_FRACTAL_NZ)
    assert torch.equal(nz, w) and nz.data_ptr() != w.data_ptr()
    assert "acl_format=7" in _both_modes(lambda: npu.npu_format_cast(w, 7))


def test_npu_ops_trace_into_compiled_graphs():
    def f(x, w_kn, s_w, bias):
        q, s = torch.ops.npu.npu_dynamic_quant(x)
        return torch.ops.npu.npu_quant_matmul(q, w_kn, s_w, pertoken_scale=s, bias=bias, output_dtype=torch.bfloat16)

    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        def fw(g, _):
            graphs.append(g)
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=fw)(gm, example_inputs)

    x = torch.randn(6, 64, dtype=torch.bfloat16)
    q_w = torch.randint(-1, 2, (24, 64), dtype=torch.int8)
    args = (x, q_w.t(), torch.rand(24) + 0.5, torch.randn(24))
    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(*args)
    assert torch.equal(out, f(*args))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.npu.npu_dynamic_quant.default in targets
    (mm,) = [n for n in graphs[0].graph.nodes if n.target == torch.ops.npu.npu_quant_matmul.default]
    assert mm.kwargs["output_dtype"] == 15  # after AOT the dtype is torch_npu's int enum


def test_probe_survives_a_broken_torch_npu(tmp_path, monkeypatch):
    """A torch_npu that fails to import (no CANN) is detected in a subprocess, not imported here."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libhccl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert emu.torch_npu_works() is False
    assert "torch_npu" not in sys.modules
    (pkg / "__init__.py").write_text("WORKS = True\n")
    assert emu.torch_npu_works() is True
    assert "torch_npu" not in sys.modules


# ---- FRACTAL_NZ: the C0 rule of int4-packed weights and the NZ limits (issue 21, points 1, 5, 7) ----


def _per_group_int4_case(k=256, n=64, g=64, m=3):
    _, q_w, s_w = _ternary(n, k, g, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8)).bfloat16()
    return x, q_w.t().contiguous().int(), s_w.t().contiguous().bfloat16()


def test_int4_nz_weight_needs_the_nz_cast_before_packing():
    """ConvertWeightToINT4PackKernelNpuOpApi.cpp: NZ-cast the int32 weight, then pack (C0 = 8); the reverse gives C0 = 16."""
    x, w_kn, scale = _per_group_int4_case()
    right = npu.npu_convert_weight_to_int4pack(npu.npu_format_cast(w_kn, emu.ACL_FORMAT_FRACTAL_NZ))
    assert emu.storage_format(right) == (emu.ACL_FORMAT_FRACTAL_NZ, 8)
    wrong = npu.npu_format_cast(npu.npu_convert_weight_to_int4pack(w_kn), emu.ACL_FORMAT_FRACTAL_NZ)
    assert emu.storage_format(wrong) == (emu.ACL_FORMAT_FRACTAL_NZ, 16)
    with emu.emulate(msd=False):  # M = 3 <= g/8 would take the MSD kernel (modelled below)
        y = npu.npu_weight_quant_batchmatmul(x, right, scale, antiquant_group_size=64)
        assert torch.equal(y, npu.npu_weight_quant_batchmatmul(x, w_kn.to(torch.int8), scale, antiquant_group_size=64))
    with pytest.raises(RuntimeError, match="C0 = 8, got C0 = 16"):
        npu.npu_weight_quant_batchmatmul(x, wrong, scale, antiquant_group_size=64)
    # customize_dtype=3 (int32) also gives C0 = 8 on A2/A3
    assert emu.storage_format(npu.npu_format_cast(w_kn, 29, customize_dtype=3)) == (29, 8)


@pytest.mark.parametrize(
    "k,n,g,match",
    [(256, 64, 32, "antiquant_group_size 64 or 128"), (192, 64, 128, "K % g == 0"), (256, 48, 64, "N % 64 == 0")],
)
def test_per_group_nz_limits(k, n, g, match):
    x, w_kn, _ = _per_group_int4_case(k, n, g)
    scale = torch.ones(-(-k // g), n, dtype=torch.bfloat16)
    nz = npu.npu_convert_weight_to_int4pack(npu.npu_format_cast(w_kn, 29))
    with pytest.raises(RuntimeError, match=match):
        npu.npu_weight_quant_batchmatmul(x, nz, scale, antiquant_group_size=g)
    npu.npu_weight_quant_batchmatmul(x, npu.npu_convert_weight_to_int4pack(w_kn), scale, antiquant_group_size=g)  # ND is fine


def test_per_channel_int4_nz_needs_a_transposed_weight():
    _, q_w, s_w = _ternary(32, 64, -1)
    x = torch.randn(4, 64).bfloat16()
    scale = s_w[:, 0].bfloat16()
    kn = npu.npu_convert_weight_to_int4pack(npu.npu_format_cast(q_w.t().contiguous().int(), 29))
    with pytest.raises(RuntimeError, match="must be transposed"):
        npu.npu_weight_quant_batchmatmul(x, kn, scale)
    nk = npu.npu_convert_weight_to_int4pack(npu.npu_format_cast(q_w.int(), 29))  # (N, K/8), NZ C0 = 8
    y = npu.npu_weight_quant_batchmatmul(x, nk.t(), scale)  # the transposed view shares the NZ tag
    assert emu.storage_format(nk.t()) == (29, 8)
    torch.testing.assert_close(y, npu.npu_weight_quant_batchmatmul(x, q_w.t(), scale), rtol=2**-7, atol=1e-2)


def test_nz_operand_with_k_or_n_equal_to_1_is_refused():
    q = torch.randint(-5, 5, (4, 32), dtype=torch.int8)
    w = npu.npu_format_cast(torch.ones(32, 1, dtype=torch.int8), 29)
    with pytest.raises(RuntimeError, match="can not be 1"):
        npu.npu_quant_matmul(q, w, torch.ones(1), pertoken_scale=torch.ones(4), output_dtype=15)
    npu.npu_quant_matmul(q, torch.ones(32, 1, dtype=torch.int8), torch.ones(1), pertoken_scale=torch.ones(4), output_dtype=15)
    with pytest.raises(RuntimeError, match="can not be 1"):
        npu.npu_weight_quant_batchmatmul(torch.ones(2, 32).bfloat16(), w, torch.ones(1, dtype=torch.bfloat16))


# ---- chips (point 6) ----


def test_310p_refuses_what_torch_npu_documents_for_a2_a3_only():
    x = torch.randn(4, 32, dtype=torch.float16)
    w = torch.randint(-1, 2, (32, 16), dtype=torch.int8)
    with emu.emulate(chip="310P"):
        for call in (
            lambda: npu.npu_dynamic_quant(x),
            lambda: npu.npu_convert_weight_to_int4pack(w.int()),
        ):
            assert "Atlas A2/A3 only, not 310P" in _both_modes(call)
        assert "float16 x and int8 weight only" in _both_modes(
            lambda: npu.npu_weight_quant_batchmatmul(x.bfloat16(), w, torch.ones(16, dtype=torch.bfloat16))
        )
        q = torch.zeros(4, 32, dtype=torch.int8)
        assert "neither pertoken_scale" in _both_modes(
            lambda: npu.npu_quant_matmul(q, w, torch.ones(16), pertoken_scale=torch.ones(4), output_dtype=5)
        )
        y = npu.npu_weight_quant_batchmatmul(x, w, torch.ones(16, dtype=torch.float16))  # the 310P path
    assert y.dtype == torch.float16
    with pytest.raises(ValueError, match="chip"):
        with emu.emulate(chip="910"):
            pass


# ---- the 65535 limit follows the A2/A3 tiling (point 8) ----


def test_a8_pertoken_path_is_exempt_from_the_65535_limit_on_a2_a3():
    k = 65544
    q = torch.randint(-3, 4, (2, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    w = torch.randint(-1, 2, (k, 2), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    s, ps = torch.full((2,), 0.5), torch.full((2,), 0.25)
    y = npu.npu_quant_matmul(q, w, s, pertoken_scale=ps, output_dtype=torch.bfloat16)
    torch.testing.assert_close(y, ((q.double() @ w.double()) * 0.125).bfloat16())
    assert "must not exceed 65535" in _both_modes(lambda: npu.npu_quant_matmul(q, w, s, output_dtype=torch.float16))
    with emu.emulate(chip="310P"):
        assert "must not exceed 65535" in _both_modes(lambda: npu.npu_quant_matmul(q, w, s, output_dtype=torch.float16))


# ---- pertoken-opt dequantization order (point 4) ----


def test_quant_matmul_dequant_orders_follow_their_kernels():
    q = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    w = torch.randint(-1, 2, (256, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    s = torch.rand(96, generator=torch.Generator().manual_seed(5)) * 0.02 + 0.01
    ps = torch.rand(64, generator=torch.Generator().manual_seed(6)) * 0.02 + 0.01
    acc = (q.double() @ w.double()).float()
    golden = (acc * s) * ps[:, None]
    opt = acc * (ps[:, None] * s)
    assert not torch.equal(golden, opt)  # the two fp32 orders differ in the last bit somewhere
    for order, want in (("scale_then_pertoken", golden), ("pertoken_opt", opt)):
        with emu.emulate(dequant_order=order):
            got = npu.npu_quant_matmul(q, w, s, pertoken_scale=ps, output_dtype=torch.float16)
        assert torch.equal(got, want.half())


# ---- the small-M MSD kernels of npu_weight_quant_batchmatmul (point 3) ----


def _round_away(t):
    return torch.sign(t) * torch.floor(t.abs() + 0.5)


def test_msd_per_channel_int8_follows_the_kernel_split():
    """msd_multicore.h: x/max -> a1 = round(. * 127.499), a2 = round(rest * 2 * 127.499**2), int8 x int8 on the cube."""
    _, q_w, s_w = _ternary(64, 128, -1, seed=9)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(10)).bfloat16()
    scale = s_w[:, 0].bfloat16()
    y = npu.npu_weight_quant_batchmatmul(x, q_w.t(), scale)
    xf = x.float()
    mx = xf.abs().amax(1, keepdim=True)
    xn = xf / mx
    a1 = _round_away(xn * 127.499)
    a2 = _round_away((xn - a1 * torch.tensor(1 / 127.499)) * (2 * 127.499 * 127.499))
    assert a1.abs().max() <= 127 and a2.abs().max() <= 128
    w = q_w.t().double()
    want = ((a1.double() @ w).float() / 127.499 + (a2.double() @ w).float() / (2 * 127.499 * 127.499)) * mx
    want = (want * scale.float()).bfloat16()
    assert torch.equal(y, want)
    # bound: |x - max * (a1/127.499 + a2/(2*127.499**2))| <= max / (4 * 127.499**2) per element
    recon = mx * (a1 / 127.499 + a2 / (2 * 127.499 * 127.499))
    assert ((recon - xf).abs() <= mx / (4 * 127.499**2) * 1.01).all()
    with emu.emulate(msd=False):
        plain = npu.npu_weight_quant_batchmatmul(x, q_w.t(), scale)
    exact = xf.double() @ (q_w.t().double() * scale.double())
    for out in (y, plain):
        torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=2**-7 * exact.abs().max().item())
    big_m = torch.randn(65, 128).bfloat16()  # M > 64: the MSD kernel does not run
    assert emu.msd_route(65, 128, 64, q_w.t(), big_m, 0, 0) is None
    assert emu.msd_route(8, 128, 64, q_w.t(), x, 0, 0) == "perchannel_int8"


def test_msd_per_group_int4_routes_and_stays_within_its_bound():
    x, w_kn, scale = _per_group_int4_case(k=256, n=64, g=64, m=8)
    packed = npu.npu_convert_weight_to_int4pack(w_kn)
    assert emu.msd_route(8, 256, 64, packed, x, 4, 64) == "pergroup_int4"
    assert emu.msd_route(9, 256, 64, packed, x, 4, 64) is None  # M > g/8
    y = npu.npu_weight_quant_batchmatmul(x, packed, scale, antiquant_group_size=64)
    w = (w_kn.double().reshape(4, 64, 64) * scale.double()[:, None, :]).reshape(256, 64)
    exact = x.double() @ w
    # three int4 parts keep x to max * 0.5 / (7.49 * 14.98**2) per element: far inside bf16's rounding
    torch.testing.assert_close(y.double(), exact, rtol=2**-7, atol=2**-7 * exact.abs().max().item())


def test_msd_per_channel_int4_needs_a_transposed_nd_weight():
    _, q_w, s_w = _ternary(64, 128, -1, seed=12)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(13)).bfloat16()
    nk = npu.npu_convert_weight_to_int4pack(q_w.int().contiguous())  # (N, K/8)
    assert emu.msd_route(8, 128, 64, nk.t(), x, 0, 0) == "perchannel_int4"
    assert emu.msd_route(40, 128, 64, nk.t(), torch.randn(40, 128), 0, 0) is None  # N < 2M
    kn = npu.npu_convert_weight_to_int4pack(q_w.t().contiguous().int())  # (K, N/8): not transposed
    assert emu.msd_route(8, 128, 64, kn, x, 0, 0) is None
    y = npu.npu_weight_quant_batchmatmul(x, nk.t(), s_w[:, 0].bfloat16())
    exact = x.double() @ (q_w.t().double() * s_w[:, 0].bfloat16().double())
    torch.testing.assert_close(y.double(), exact, rtol=2**-7, atol=2**-7 * exact.abs().max().item())
