"""The serving fast paths: one C call per packed layer, the fp32 GEMV for float layers a packed model keeps.

Both must compute exactly what the general kernel entry points compute (the prepared call is
the same C kernel, so bit-equal) and follow every change of the tensors they were built from.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
import reference_impl as ref
from bitcompile.kernels import cpu, packing
from bitcompile.models import TinyLlama, TinyLlamaConfig
from bitcompile.runtime.modules import FloatGemvLinear

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C kernels not built: {cpu.unavailable_reason()}")


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request, monkeypatch):
    if not cpu.isa_supported(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("BITCOMPILE_ISA", request.param)
    return request.param


@pytest.mark.parametrize("group", [(-1, -1), (0, "tensor"), (64, 64), (96, 96), (100, 100)])
@pytest.mark.parametrize("shape", [(1, 13, 100), (1, 67, 576), (3, 5, 257), (2, 4, 1), (40, 9, 700)])
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
)
def test_prepared_call_is_the_packed_kernel_bit_for_bit(isa, group, shape, dtypes):
    code, group_size = group
    m, n, k = shape
    x_dtype, out_dtype = dtypes
    g = torch.Generator().manual_seed(m * 7 + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = (torch.randn(m, k, generator=g) * 3).to(x_dtype)
    q, s = ref.ternary_codes(w, group_size)
    packed = packing.pack_codes(q.to(torch.int8))
    prepared = cpu.PreparedPackedLinear(packed, s, k, code, b)
    got = prepared(x, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert torch.equal(got, cpu.packed_linear(x, packed, s, k, code, b, True, out_dtype))
    # and against the independent formulas (fp32 out; bf16 adds one rounding)
    if out_dtype == torch.float32:
        torch.testing.assert_close(
            got.double(), ref.ternary_linear_forward(x.float(), w, b, group_size, "int8"), rtol=1e-5, atol=1e-4
        )
    # leading dimensions and a non-contiguous input are handled like a reshape
    x3 = torch.cat([x, x], dim=1).reshape(m, 2, k)[:, 0:1, :]  # (m, 1, k), strided
    assert torch.equal(prepared(x3, out_dtype).reshape(m, n), got)


def test_prepared_call_rejects_bad_arguments():
    q = torch.randint(-1, 2, (8, 64), dtype=torch.int8)
    packed = packing.pack_codes(q)
    with pytest.raises(ValueError, match="w_scales must have shape"):
        cpu.PreparedPackedLinear(packed, torch.ones(7, 1), 64, -1, None)
    with pytest.raises(ValueError, match="bias shape"):
        cpu.PreparedPackedLinear(packed, torch.ones(8, 1), 64, -1, torch.zeros(3))
    prepared = cpu.PreparedPackedLinear(packed, torch.ones(8, 1), 64, -1, None)
    with pytest.raises(ValueError, match="activations have 63 features, the layer takes 64"):
        prepared(torch.randn(2, 63), torch.float32)


def _packed_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32))
    return bitcompile.pack(model)


def test_packed_layer_follows_in_place_updates_and_replaced_buffers():
    model = _packed_mlp()
    layer = model[2]
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = model(x)
        hidden = model[1](model[0](x))
        layer.scales.mul_(2)  # in place: the prepared call must see it
        torch.testing.assert_close(model(x), 2 * (before - layer.bias) + layer.bias, rtol=1e-5, atol=1e-5)
        layer.bias = torch.zeros(32)  # replaced buffer
        expected = cpu.packed_linear(
            hidden, layer.packed, layer.scales, 64, layer.group_code, None, True, torch.float32
        )
        assert torch.equal(model(x), expected)
        other = _packed_mlp(seed=1)
        model.load_state_dict(other.state_dict())  # copies into the same tensors
        assert torch.equal(model(x), other(x))


def test_packed_model_copies_and_pickles_after_serving():
    model = _packed_mlp()
    x = torch.randn(2, 96)
    with torch.no_grad():
        y = model(x)  # builds the prepared calls (ctypes pointers)
        assert torch.equal(copy.deepcopy(model)(x), y)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), y)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("nk", [(1, 1), (5, 7), (67, 576), (33, 1000), (4, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_gemv_matches_float64(isa, m, nk, bias):
    n, k = nk
    g = torch.Generator().manual_seed(n * k + m)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = cpu.dense_linear(x, w, b)
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    bound = (x.abs().double() @ w.abs().double().t()) * k * 2**-24 + 1e-6  # fp32 summation bound
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(cpu.dense_linear(x[:, None, :].squeeze(1), w, b), got)


def test_dense_gemv_leaves_other_cases_to_torch():
    w = torch.randn(10, 16)
    x = torch.randn(cpu.DENSE_MAX_M + 1, 16)
    assert torch.equal(cpu.dense_linear(x, w, None), F.linear(x, w))  # prefill sizes: torch's GEMM
    assert torch.equal(cpu.dense_linear(x[:1].double(), w.double(), None), F.linear(x[:1].double(), w.double()))
    with pytest.raises(ValueError, match="activations have 15 features, the weight has 16"):
        cpu.dense_linear(torch.randn(1, 15), w, None)


def test_pack_serves_the_tied_head_with_the_gemv_and_keeps_it_tied():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96)).eval()
    tokens = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        plain = bitcompile.pack(copy.deepcopy(model), float_gemv=False)
        assert type(plain.lm_head) is nn.Linear
        bitcompile.pack(model)
        assert type(model.lm_head) is FloatGemvLinear and isinstance(model.lm_head, nn.Linear)
        assert model.lm_head.weight is model.embed_tokens.weight and set(model.state_dict()) == set(plain.state_dict())
        reason = {d.name: d.reason for d in model.bitcompile_pack_plan}["lm_head"]
        assert "embed_tokens.weight" in reason and "GEMV" in reason
        # prefill (M > 8) runs F.linear, bit-equal; a one-token step runs the GEMV, within fp32 rounding
        assert torch.equal(model(tokens), plain(tokens))
        torch.testing.assert_close(model(tokens[:, :1]), plain(tokens[:, :1]), rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # autograd through the head needs torch's op
        assert torch.equal(model(tokens[:, :1]), plain(tokens[:, :1]))


def test_packed_op_reuses_its_prepared_call_and_lets_the_weights_go():
    import gc
    import weakref

    q = torch.randint(-1, 2, (24, 130), dtype=torch.int8)
    packed, scales, x = packing.pack_codes(q), torch.rand(24, 1) + 0.5, torch.randn(3, 130)
    op = torch.ops.bitcpm.ternary_linear_packed
    y = op(x, packed, scales, None, 130, -1, True, "cpu")
    assert torch.equal(y, cpu.packed_linear(x, packed, scales, 130, -1, None, True, torch.float32))
    scales.mul_(2)  # in place: the cached call must notice
    torch.testing.assert_close(op(x, packed, scales, None, 130, -1, True, "cpu"), 2 * y)
    alive = weakref.ref(packed)
    del packed
    gc.collect()
    assert alive() is None  # the cache does not keep weights alive


def test_prepared_call_follows_moved_data_and_outlives_its_sources():
    torch.manual_seed(3)
    q = torch.randint(-1, 2, (16, 96), dtype=torch.int8)
    x = torch.randn(2, 96)
    packed, scales = packing.pack_codes(q), torch.rand(16, 1) + 0.5
    prepared = cpu.PreparedPackedLinear(packed, scales, 96, -1, None)
    want = cpu.packed_linear(x, packed, scales, 96, -1, None, True, torch.float32)
    scales.data = scales.data * 3  # new storage, same object, no version bump
    assert not prepared.is_current(packed, scales, None)
    del packed, scales  # the prepared call keeps the data it reads alive
    assert torch.equal(prepared(x), want)
    with pytest.raises(TypeError, match="CPU float32/bfloat16"):
        prepared(x.half())


def test_packed_layer_edge_cases_stay_correct():
    with torch.inference_mode():  # inference tensors have no version counter
        model = _packed_mlp()
        x = torch.randn(2, 96)
        assert torch.equal(model(x), model(x))
    model = _packed_mlp()
    layer = model[0]
    with torch.no_grad():
        model(x)
        layer.quantize_activations = False  # a flag changed after the fast path was built
        weight_only = cpu.packed_linear(x, layer.packed, layer.scales, 96, -1, layer.bias, False, torch.float32)
        assert torch.equal(layer(x), weight_only)
        empty = bitcompile.PackedTernaryLinear(0, 5, bias=True)
        empty.bias.copy_(torch.arange(5.0))
        assert torch.equal(empty(torch.randn(3, 0)), torch.arange(5.0).expand(3, 5))  # an empty sum: the bias


def test_dense_gemv_leaves_a_broadcast_bias_to_torch():
    x, w = torch.randn(1, 16), torch.randn(10, 16)
    assert torch.equal(cpu.dense_linear(x, w, torch.ones(1)), F.linear(x, w, torch.ones(1)))


@pytest.mark.parametrize("group", [(-1, -1), (32, 32)])
def test_gradients_flow_through_a_packed_layer_to_an_adapter(group):
    """A packed base with a trainable layer in front (LoRA style): grad_x = g @ (codes * scales)."""
    code, group_size = group
    torch.manual_seed(0)
    adapter = nn.Linear(40, 64)
    w = torch.randn(24, 64)
    q, s = ref.ternary_codes(w, group_size)
    layer = bitcompile.PackedTernaryLinear.from_codes(
        q.to(torch.int8), s, torch.randn(24), bitcompile.TernaryConfig(group_size=group_size), torch.float32
    )
    x = torch.randn(3, 5, 40)
    y = layer(adapter(x))
    assert y.requires_grad
    g = torch.randn_like(y)
    y.backward(g)
    hidden = adapter(x).detach()
    w_q = ref.fake_quant_weight(w, group_size)  # the dequantized ternary weight, independently
    want_hidden_grad = g.reshape(-1, 24).double() @ w_q.double()
    want_adapter_grad = want_hidden_grad.t() @ x.reshape(-1, 40).double()
    torch.testing.assert_close(adapter.weight.grad.double(), want_adapter_grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the forward is the packed kernel's
        assert torch.equal(y.detach(), layer(hidden))


class _BodyAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.lm_head = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.lm_head(torch.relu(self.body(x)))


@pytest.mark.parametrize("activations", ["int8", None])
def test_a_nan_or_inf_activation_gives_nan_on_every_path(isa, activations):
    """Regression (issue 15, item 4): on AVX2 / AVX-512 a token holding a NaN, or a mix of
    +-inf and NaN, came out finite from packed, frozen, compiled packed and QAT models; the
    scalar kernel and the reference give NaN. W1.58A8: every output of such a token is NaN.
    Weight-only: the reference's matmul (x * 0 is NaN for a NaN / inf x, else +-inf)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8))
    x = torch.randn(4, 64)
    x[1, 7], x[2, 0], x[3, 5:8] = float("nan"), float("inf"), torch.tensor([float("-inf"), float("inf"), float("nan")])
    config = bitcompile.TernaryConfig(activations=activations)
    options = {"activations": activations, "inner": "aot_eager"}
    with torch.no_grad():
        want = ref.ternary_linear_forward(x, model[0].weight, model[0].bias, -1, activations).float()
        if activations == "int8":
            want[1:] = float("nan")  # s_x is NaN or inf: x / s_x holds a NaN, so does every dot product
        qat = torch.compile(copy.deepcopy(model), backend="bitcpm", options=options)(x)
        frozen = torch.compile(copy.deepcopy(model).eval(), backend="bitcpm", options={**options, "freeze": True})(x)
        packed = bitcompile.pack(copy.deepcopy(model), config)
        eager = packed(x)
        compiled = torch.compile(packed, backend="bitcpm", options=options)(x)
        head_config = bitcompile.TernaryConfig(activations=activations, exclude=["lm_head"])
        head_out = bitcompile.pack(_BodyAndHead(), head_config, head="int8")(x)
    assert torch.isnan(want[3]).all() and not torch.isfinite(want[2]).any()
    for name, y in {"QAT (no_grad)": qat, "freeze": frozen, "packed": eager, "compiled packed": compiled}.items():
        assert torch.equal(torch.isnan(y), torch.isnan(want)), name
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)  # +-inf: same signs
    assert torch.isnan(head_out[1:]).all() and torch.isfinite(head_out[:1]).all()


def _packed_bf16_layer(seed):
    torch.manual_seed(seed)
    return bitcompile.pack(nn.Sequential(nn.Linear(96, 64)).to(torch.bfloat16))


def _load_under_inference_mode(model):
    with torch.inference_mode():
        model.load_state_dict(_packed_bf16_layer(1).state_dict())


# writes the version counter does not see (issue 15, item 5)
UNTRACKED_WRITES = {
    "load_state_dict of inference tensors": _load_under_inference_mode,
    "bias.data.add_": lambda model: model[0].bias.data.add_(1.0),
    "packed.data.copy_": lambda model: model[0].packed.data.copy_(_packed_bf16_layer(2)[0].packed),
    "scales.data.mul_": lambda model: model[0].scales.data.mul_(2.0),
}


@pytest.mark.parametrize("how", list(UNTRACKED_WRITES))
def test_packed_bf16_layer_never_serves_a_stale_copy(how):
    """The prepared call kept an fp32 copy of the bf16 bias, stale after these writes; it now
    reads the layer's own tensors. Checked for the eager module and the op compiled graphs call."""
    inference = how == "load_state_dict of inference tensors"
    with torch.inference_mode(inference):
        model = _packed_bf16_layer(0)  # under inference mode: inference tensors, no version counter
        x = torch.randn(3, 96, dtype=torch.bfloat16)
    layer = model[0]

    def op():
        return torch.ops.bitcpm.ternary_linear_packed(x, layer.packed, layer.scales, layer.bias, 96, -1, True, "cpu")

    with torch.inference_mode(inference), torch.no_grad():
        before = model(x)
        assert torch.equal(op(), before)
        UNTRACKED_WRITES[how](model)
        want = cpu.packed_linear(x, layer.packed, layer.scales, 96, -1, layer.bias, True, torch.bfloat16)  # no cache
        assert not torch.equal(want, before)
        assert torch.equal(model(x), want)
        assert torch.equal(op(), want)


def test_prepared_call_reads_a_bf16_bias_as_it_is():
    q = torch.randint(-1, 2, (8, 64), dtype=torch.int8)
    packed, scales, x = packing.pack_codes(q), torch.rand(8, 1) + 0.5, torch.randn(20, 64)
    bias = torch.randn(8).to(torch.bfloat16)
    prepared = cpu.PreparedPackedLinear(packed, scales, 64, -1, bias)
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(prepared(x, out_dtype), cpu.packed_linear(x, packed, scales, 64, -1, bias, True, out_dtype))
    with pytest.raises(ValueError, match="must be contiguous"):
        cpu.PreparedPackedLinear(packed, scales, 64, -1, torch.randn(16)[::2])
    with pytest.raises(ValueError, match="must be contiguous"):
        cpu.PreparedPackedLinear(packed, scales, 64, -1, torch.randn(8).half())
