"""Lower-precision training backward of the "cpu" kernels (``backward_precision`` "bf16" / "int8").

What each precision claims (docs/kernels.md, "Training"):

- ``"int8"`` grad_input: ``g * s_w`` quantized per row with the activation quantizer, times the
  exact ternary codes with ``torch._int_mm``: the integer sums are exact, so the result equals
  the independent int64 computation bit for bit.
- ``"bf16"`` (and ``"int8"``'s grad_weight): the int8 / ternary codes are exact in bf16, so the
  only roundings are ``g * s`` to bf16 and the bf16 GEMM output: within one bf16 ulp of the
  exact product of the rounded operands.
- Against the fp32 straight-through reference (tests/reference_impl.py) the relative (Frobenius)
  gradient error is bounded: bf16 <= 1e-2 (measured ~2.4e-3), int8 grad_input <= 3e-2
  (measured ~8e-3); fp32 stays at fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import reference_impl as ref
from bitcompile import TernaryConfig, TernaryConfigError
from bitcompile.kernels import cpu, reference
from bitcompile.models import MLP

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"C kernels not built: {cpu.unavailable_reason()}")

GROUPS = [(-1, -1), (0, "tensor"), (32, 32), (48, 48)]  # kernel code, reference_impl spelling
BOUND = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _problem(m=96, n=80, k=136, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    grad = torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g) * 1e-2
    return x, w, b, grad


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("groups", GROUPS)
def test_gradients_match_fake_quant_reference(precision, groups):
    code, spelled = groups
    x, w, b, grad = _problem()
    xc, wc, bc = (t.clone().requires_grad_() for t in (x, w, b))
    y = torch.ops.bitcpm.ternary_linear(xc, wc, bc, code, True, "cpu", precision)[0]
    y.backward(grad)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref.fake_quant_linear(xr, wr, br, spelled, "int8").backward(grad)
    assert _rel(wc.grad, wr.grad) <= BOUND[precision], _rel(wc.grad, wr.grad)
    assert _rel(xc.grad, xr.grad) <= BOUND[precision if (precision, code > 0) != ("int8", True) else "bf16"]
    torch.testing.assert_close(bc.grad, br.grad, rtol=1e-6, atol=1e-6)  # grad_bias is an fp32 sum always
    if precision != "fp32":  # and it is really lower precision (the option is not ignored)
        assert _rel(xc.grad, xr.grad) > 1e-6 and _rel(wc.grad, wr.grad) > 1e-6


@pytest.mark.parametrize("spelled,code", [(-1, -1), ("tensor", 0)])
def test_int8_grad_input_is_exact_integer_product(spelled, code):
    _, w, _, grad = _problem(seed=1)
    q_w, s_w = ref.ternary_codes(w, spelled)  # independent: int64 codes, fp32 scales
    g = grad * s_w[:, 0] if code < 0 else grad
    q_g, s_g = ref.activation_codes(g)  # the same absmax int8 formula, written independently
    expected = (q_g @ q_w).float() * s_g[:, None]  # int64 matmul: exact
    if code == 0:
        expected = expected * s_w[0, 0]
    got, _, _ = cpu.ternary_linear_backward(
        grad, torch.zeros(1, 1, dtype=torch.int8), None, q_w.to(torch.int8), s_w, code, True, False, False, precision="int8"
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_grad_weight_rounds_only_the_float_operand(precision):
    x, w, _, grad = _problem(seed=2)
    q_x, s_x = reference.quantize_activations(x)
    q_w, s_w = reference.quantize_weight(w, -1)
    _, gw, _ = cpu.ternary_linear_backward(grad, q_x, s_x, q_w, s_w, -1, False, True, False, precision=precision)
    operand = (grad * s_x[:, None]).to(torch.bfloat16).double()  # the one rounding of an input
    exact = operand.t() @ q_x.double()  # codes are exact in bf16
    ulp = exact.abs() * 2.0**-8 + 1e-30  # one bf16 rounding of the output (8 significant bits)
    assert ((gw.double() - exact).abs() <= ulp).all()


def test_weight_only_bf16_backward():
    x, w, _, grad = _problem(seed=3)
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.ops.bitcpm.ternary_linear(xc, wc, None, -1, False, "cpu", "bf16")[0].backward(grad)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref.fake_quant_linear(xr, wr, None, -1, None).backward(grad)
    assert _rel(wc.grad, wr.grad) <= 1e-2 and _rel(xc.grad, xr.grad) <= 1e-2


def test_bf16_model_gradients_keep_dtype():
    x, w, _, grad = _problem(seed=4)
    xc, wc = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    torch.ops.bitcpm.ternary_linear(xc, wc, None, -1, True, "cpu", "int8")[0].backward(grad.bfloat16())
    assert xc.grad.dtype == torch.bfloat16 and wc.grad.dtype == torch.bfloat16
    xr, wr = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    torch.ops.bitcpm.ternary_linear(xr, wr, None, -1, True, "cpu", "fp32")[0].backward(grad.bfloat16())
    assert _rel(wc.grad, wr.grad) <= 1e-2 and _rel(xc.grad, xr.grad) <= 3e-2


def test_reference_kernel_ignores_precision_and_bad_values_raise():
    x, w, b, grad = _problem(seed=5)
    grads = []
    for precision in ("fp32", "int8"):
        xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.ops.bitcpm.ternary_linear(xc, wc, b, -1, True, "reference", precision)[0].backward(grad)
        grads.append((xc.grad, wc.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="fp16"):
        torch.ops.bitcpm.ternary_linear(x, w, b, -1, True, "cpu", "fp16")
    with pytest.raises(ValueError, match="fp16"):
        cpu.ternary_linear_backward(grad, x, None, w.sign().to(torch.int8), w[:, :1], -1, True, True, False, "fp16")


def test_config_option_validated_and_round_trips():
    assert TernaryConfig().backward_precision == "fp32"
    cfg = TernaryConfig.from_options({"backward_precision": "int8"})
    assert cfg.backward_precision == "int8" and TernaryConfig.from_options(cfg.to_options()) == cfg
    for bad in ("fp16", "INT8", None, 8):
        with pytest.raises(TernaryConfigError, match="backward_precision"):
            TernaryConfig.from_options({"backward_precision": bad})


def test_opcheck_with_precision():
    x, w, b, _ = _problem(m=5, n=6, k=40, seed=6)
    args = (x.requires_grad_(), w.requires_grad_(), b, -1, True, "cpu", "int8")
    torch.library.opcheck(torch.ops.bitcpm.ternary_linear.default, args)


def _curve(precision, steps=40):
    torch.manual_seed(0)
    teacher, student = MLP(32, [64], 8), MLP(32, [128, 128], 8)
    if precision is None:
        model = forward = ref.swap_linears_for_fake_quant(copy.deepcopy(student), skip=())
    else:
        model = copy.deepcopy(student)
        forward = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", "backward_precision": precision})
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, 32, generator=gen)
        loss = F.cross_entropy(forward(x), teacher(x).argmax(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_training_curves_follow_fp32_reference():
    """Effect on training: the compiled curve with a lower-precision backward stays on the fp32 fake-quant curve."""
    reference_curve = _curve(None)
    for precision, rtol in (("fp32", 1e-3), ("bf16", 1e-2), ("int8", 2e-2)):
        curve = _curve(precision)
        assert curve[-1] < 0.7 * curve[0], (precision, curve)
        torch.testing.assert_close(curve, reference_curve, rtol=rtol, atol=1e-4, msg=precision)
