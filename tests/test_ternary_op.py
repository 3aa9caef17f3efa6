"""bitcpm::ternary_linear and its fused backward against the independent reference (tests/reference_impl.py).

Tolerances: fp32 outputs within 1e-5 relative of the fp64 reference (the op accumulates
exact integers and scales in fp32); bf16 outputs within one bf16 rounding (rtol 2**-7).
Quantized codes must match exactly.
"""

import itertools

import pytest
import torch

import bitcompile.kernels.reference as reference_kernel
import reference_impl as ref
from bitcompile.runtime import ops  # noqa: F401  (registers the ops)

GROUPS = [-1, "tensor", 32, 64, 128]
N, K = 24, 200  # K is not a multiple of 32, 64 or 128: every group mode has a short last group


def code(group_size):
    return 0 if group_size == "tensor" else group_size


def make_inputs(ndim, dtype, bias, requires_grad=True):
    lead = {2: (5,), 3: (2, 3), 4: (2, 2, 3)}[ndim]
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=requires_grad)
    w = (torch.randn(N, K) * 0.05).to(dtype).requires_grad_(requires_grad)
    b = (torch.randn(N) * 0.1).to(dtype).requires_grad_(requires_grad) if bias else None
    return x, w, b


def run_op(x, w, b, group_size, activations):
    return torch.ops.bitcpm.ternary_linear(x, w, b, code(group_size), activations == "int8", "reference")


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)


def reference_grads(x, w, b, g, group_size, activations):
    """DESIGN.md §3 straight-through gradients in fp64 from the reference codes."""
    x2d = x.detach().reshape(-1, K).double()
    g2d = g.reshape(-1, N).double()
    wq = ref.fake_quant_weight(w, group_size).double()
    if activations == "int8":
        q, s = ref.activation_codes(x2d)
        xq = q.double() * s.double()[:, None]
    else:
        xq = x2d
    return (g2d @ wq).reshape(x.shape), g2d.t() @ xq, (g2d.sum(0) if b is not None else None)


@pytest.mark.parametrize(
    "group_size, activations, bias, ndim, dtype",
    list(itertools.product(GROUPS, ["int8", None], [True, False], [2, 3, 4], [torch.float32, torch.bfloat16])),
)
def test_forward_and_gradients_match_reference(group_size, activations, bias, ndim, dtype):
    x, w, b = make_inputs(ndim, dtype, bias)
    y, x_codes, x_scales, w_codes, w_scales = run_op(x, w, b, group_size, activations)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype

    q_w, s_w = ref.ternary_codes(w, group_size)
    assert torch.equal(w_codes.long(), q_w)
    torch.testing.assert_close(w_scales, s_w, rtol=1e-6, atol=0)
    if activations == "int8":
        q_x, s_x = ref.activation_codes(x.reshape(-1, K))
        assert torch.equal(x_codes.long(), q_x) and torch.equal(x_scales, s_x)
    else:
        assert x_codes.numel() == 0 and x_scales.numel() == 0

    expected = ref.ternary_linear_forward(x, w, b, group_size, activations)
    torch.testing.assert_close(y.double(), expected, **tolerance(dtype))

    g = torch.randn_like(y)
    y.backward(g)
    gx, gw, gb = reference_grads(x, w, b, g, group_size, activations)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), gx, **tolerance(dtype))
    torch.testing.assert_close(w.grad.double(), gw, **tolerance(dtype))
    if bias:
        torch.testing.assert_close(b.grad.double(), gb, **tolerance(dtype))


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("activations", ["int8", None])
def test_matches_eager_fake_quant_ste_autograd(group_size, activations):
    """The paper-style ``w + (q(w) - w).detach()`` reference gives the same values and gradients."""
    x, w, b = make_inputs(3, torch.float32, bias=True)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = run_op(x, w, b, group_size, activations)[0]
    y_ref = ref.fake_quant_linear(x2, w2, b2, group_size, activations)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "group_size, activations, dtype, ndim",
    [
        *itertools.product(GROUPS, ["int8", None], [torch.float32, torch.bfloat16], [3]),
        (-1, "int8", torch.float32, 2),
        (32, None, torch.bfloat16, 4),
    ],
)
def test_opcheck(group_size, activations, dtype, ndim):
    x, w, b = make_inputs(ndim, dtype, bias=True)
    torch.library.opcheck(
        torch.ops.bitcpm.ternary_linear.default, (x, w, b, code(group_size), activations == "int8", "reference")
    )


def test_opcheck_backward_op():
    g = torch.randn(6, N)
    q_x = torch.randint(-128, 128, (6, K), dtype=torch.int8)
    s_x = torch.rand(6) + 0.01
    q_w = torch.randint(-1, 2, (N, K), dtype=torch.int8)
    s_w = torch.rand(N, 7) + 0.01
    args = (g, q_x, s_x, q_w, s_w, 32, torch.float32, torch.float32, True, True, True, "reference")
    torch.library.opcheck(torch.ops.bitcpm.ternary_linear_backward.default, args)


@pytest.mark.parametrize("group_size, activations", [(-1, "int8"), ("tensor", None), (64, "int8")])
def test_compiled_matches_reference(group_size, activations):
    x, w, b = make_inputs(3, torch.float32, bias=True)
    fn = torch.compile(lambda x, w, b: run_op(x, w, b, group_size, activations)[0], backend="aot_eager", fullgraph=True)
    y = fn(x, w, b)
    torch.testing.assert_close(y.double(), ref.ternary_linear_forward(x, w, b, group_size, activations), **tolerance(torch.float32))
    g = torch.randn_like(y)
    y.backward(g)
    gx, gw, gb = reference_grads(x, w, b, g, group_size, activations)
    for got, want in ((x.grad, gx), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got.double(), want, **tolerance(torch.float32))


def test_backward_skips_unneeded_gradients(monkeypatch):
    calls = []
    original = reference_kernel.ternary_linear_backward

    def spy(*args):
        calls.append(args[-3:])
        return original(*args)

    monkeypatch.setattr(reference_kernel, "ternary_linear_backward", spy)
    x, w, _ = make_inputs(2, torch.float32, bias=False)
    x.requires_grad_(False)
    run_op(x, w, None, -1, "int8")[0].sum().backward()
    assert calls == [(False, True, False)]
    assert x.grad is None and w.grad is not None


def test_saved_tensors_are_codes_not_float_weight():
    """What autograd keeps for backward: int8 activation and weight codes plus fp32 scales."""
    x, w, b = make_inputs(3, torch.float32, bias=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        run_op(x, w, b, -1, "int8")
    assert sorted(str(t.dtype) for t in saved) == ["torch.float32", "torch.float32", "torch.int8", "torch.int8"]
    assert not any(t.shape == w.shape and t.is_floating_point() for t in saved)


def test_nan_input_propagates_to_its_row_only():
    x, w, b = make_inputs(2, torch.float32, bias=True, requires_grad=False)
    x[1, 3] = float("nan")
    y = run_op(x, w, b, -1, "int8")[0]
    assert torch.isnan(y[1]).all()
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(
        y[keep].double(), ref.ternary_linear_forward(x[keep], w, b, -1, "int8"), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("group_size", GROUPS)
def test_zero_weight_row_clamps_scale_to_eps(group_size):
    x, w, b = make_inputs(2, torch.float32, bias=True)
    with torch.no_grad():
        w[3] = 0
    y, _, _, w_codes, w_scales = run_op(x, w, b, group_size, "int8")
    assert torch.isfinite(y).all()
    assert (w_codes[3] == 0).all()
    if group_size != "tensor":
        assert (w_scales[3] == 1e-5).all()
    torch.testing.assert_close(y[:, 3], b[3].detach().expand(5), rtol=0, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(x.grad).all()


def test_bad_shapes_and_dtypes_raise_clear_errors():
    w = torch.randn(N, K)
    with pytest.raises(ValueError, match="does not match weight in_features 200"):
        run_op(torch.randn(3, K + 1), w, None, -1, "int8")
    with pytest.raises(ValueError, match="bias shape"):
        run_op(torch.randn(3, K), w, torch.randn(N + 1), -1, "int8")
    with pytest.raises(TypeError, match="floating point"):
        run_op(torch.randint(0, 3, (3, K)), w, None, -1, "int8")
    with pytest.raises(ValueError, match="group_size code -2"):
        torch.ops.bitcpm.ternary_linear(torch.randn(3, K), w, None, -2, True, "reference")
    with pytest.raises(ValueError, match="unknown bitcpm kernel"):
        torch.ops.bitcpm.ternary_linear(torch.randn(3, K), w, None, -1, True, "fast")


def test_user_weight_is_not_mutated():
    x, w, b = make_inputs(3, torch.float32, bias=True)
    before = w.detach().clone()
    run_op(x, w, b, 32, "int8")[0].sum().backward()
    assert torch.equal(w.detach(), before)
