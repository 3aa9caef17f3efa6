"""The backend as users meet it: entry point, the user's model untouched, training semantics, inductor."""

import copy
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import reference_impl as ref
from bitcompile.models import MLP


def test_entry_point_works_in_a_fresh_process_without_import():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(16, 8)
        y = torch.compile(m, backend="bitcpm", options={"inner": "eager"})(torch.randn(2, 16))
        assert "bitcompile" in sys.modules, "the entry point should have imported bitcompile lazily"
        assert "bitcpm" in torch._dynamo.list_backends()
        print("ok", tuple(y.shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok (2, 8)" in result.stdout


def _train(model, forward, steps=5, lr=1e-2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen)
        target = torch.randint(0, 5, (16,), generator=gen)
        loss = F.cross_entropy(forward(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_unchanged_and_optimizer_updates_latent_weights_like_fake_quant_training():
    torch.manual_seed(0)
    model = MLP(12, [32, 32], 5)
    reference = copy.deepcopy(model)
    before = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}

    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    losses = _train(model, compiled)
    ref.swap_linears_for_fake_quant(reference, skip=())
    ref_losses = _train(reference, reference)

    assert {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} == before
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    # Same parameters in the same order (the reference wraps each Linear, so names differ).
    for param, ref_param in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref_param, rtol=1e-4, atol=1e-5)


def test_eval_no_grad_inference_uses_ternary_weights():
    torch.manual_seed(0)
    model = MLP(12, [32], 5).eval()
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    x = torch.randn(4, 12)
    with torch.no_grad():
        got = compiled(x)
    hidden = F.gelu(ref.fake_quant_linear(x, model.hidden[0].weight, model.hidden[0].bias, -1, "int8"))
    expected = ref.fake_quant_linear(hidden, model.out.weight, model.out.bias, -1, "int8")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(x), atol=1e-3), "compiled inference must not fall back to float weights"


def test_inductor_end_to_end_bf16_weight_only_groups():
    torch.manual_seed(0)
    model = MLP(64, [96], 8).to(torch.bfloat16)
    options = {"group_size": 32, "activations": None}  # inner defaults to inductor
    compiled = torch.compile(model, backend="bitcpm", options=options)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    assert y.dtype == torch.bfloat16
    hidden = F.gelu(ref.ternary_linear_forward(x, model.hidden[0].weight, model.hidden[0].bias, 32, None).to(torch.bfloat16))
    expected = ref.ternary_linear_forward(hidden, model.out.weight, model.out.bias, 32, None)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_autocast_bf16_keeps_ternary_layers_and_fp32_master_weights():
    """Mixed precision (fp32 master weights, ``torch.autocast`` bf16): autocast must not turn the
    rewritten layers back into bf16 ``F.linear`` on float weights; their forward stays the exact
    int8 x ternary product, the gradients reach the fp32 latent weights."""
    torch.manual_seed(0)
    model = MLP(12, [32], 5)
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", "backward_precision": "int8"})
    x = torch.randn(6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(x)
    hidden = F.gelu(ref.ternary_linear_forward(x, model.hidden[0].weight, model.hidden[0].bias, -1, "int8").float())
    expected = ref.ternary_linear_forward(hidden, model.out.weight, model.out.bias, -1, "int8")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    F.cross_entropy(got, torch.arange(6) % 5).backward()
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
