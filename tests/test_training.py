"""Quantization-aware training end to end: loss goes down, gradients reach every ternary weight,
tied embeddings stay float, and the loss curve follows the eager fake-quant reference.

Tolerance on curves: the first 20 steps agree to 1e-3 relative (the two runs differ only in
float summation order); afterwards tiny differences can flip a rounding decision and the runs
drift apart, so the mean of the last 20 steps must agree to 10 %.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import bitcompile
import reference_impl as ref
from bitcompile.data.synthetic_text import CharTokenizer, make_text, random_batches
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig

STEPS = 200


def _compare_curves(losses, ref_losses):
    assert losses[-1] < 0.5 * losses[0], f"loss did not go down: {losses[0]:.3f} -> {losses[-1]:.3f}"
    torch.testing.assert_close(torch.tensor(losses[:20]), torch.tensor(ref_losses[:20]), rtol=1e-3, atol=1e-4)
    tail, ref_tail = sum(losses[-20:]) / 20, sum(ref_losses[-20:]) / 20
    assert abs(tail - ref_tail) <= 0.1 * ref_tail, (tail, ref_tail)


def _assert_every_rewritten_weight_got_gradient(model, report):
    for layer in report.rewritten:
        grad = model.get_parameter(layer.weight_name).grad
        assert grad is not None and grad.abs().sum() > 0, layer.name


def test_mlp_teacher_student():
    torch.manual_seed(0)
    teacher = MLP(16, [32], 4)
    student = MLP(16, [64, 64], 4)
    reference = ref.swap_linears_for_fake_quant(copy.deepcopy(student), skip=())
    compiled = torch.compile(student, backend="bitcpm", options={"inner": "aot_eager", "group_size": 32})
    for ref_module in reference.modules():
        if isinstance(ref_module, ref.FakeQuantLinear):
            ref_module.group_size = 32

    def run(model, forward):
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(STEPS):
            x = torch.randn(64, 16, generator=gen)
            loss = F.cross_entropy(forward(x), teacher(x).argmax(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    losses = run(student, compiled)
    _assert_every_rewritten_weight_got_gradient(student, bitcompile.explain(student, torch.randn(2, 16)))
    _compare_curves(losses, run(reference, reference))


def _lm_losses(model, forward, tokens, steps, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for inputs, targets in random_batches(tokens, 8, 32, steps, seed=0):
        loss = loss_fn(forward, inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _logits_loss(forward, inputs, targets):
    return F.cross_entropy(forward(inputs).flatten(0, 1), targets.flatten())


def test_tiny_llama_trains_with_tied_head_skipped():
    text = make_text(8000)
    tokenizer = CharTokenizer(text)
    tokens = tokenizer.encode(text)
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96))
    reference = ref.swap_linears_for_fake_quant(copy.deepcopy(model))
    report = bitcompile.explain(model, tokens[:32].unsqueeze(0))
    head = next(layer for layer in report.layers if layer.name == "lm_head")
    assert not head.rewritten and "embedding at embed_tokens" in head.reason
    assert len(report.rewritten) == 7 * model.config.num_layers

    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    losses = _lm_losses(model, compiled, tokens, STEPS, _logits_loss)
    _assert_every_rewritten_weight_got_gradient(model, report)
    _compare_curves(losses, _lm_losses(reference, reference, tokens, STEPS, _logits_loss))


def test_hf_llama_for_causal_lm_trains():
    transformers = pytest.importorskip("transformers")
    text = make_text(8000)
    tokenizer = CharTokenizer(text)
    tokens = tokenizer.encode(text)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    reference = ref.swap_linears_for_fake_quant(copy.deepcopy(model))

    def hf_loss(forward, inputs, targets):
        return F.cross_entropy(forward(input_ids=inputs).logits.flatten(0, 1), targets.flatten())

    report = bitcompile.explain(model, tokens[:32].unsqueeze(0))
    names = {layer.name: layer for layer in report.layers}
    assert "model.layers.1.mlp.down_proj" in names and names["model.layers.1.mlp.down_proj"].rewritten
    assert not names["lm_head"].rewritten and "embedding" in names["lm_head"].reason

    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    losses = _lm_losses(model, compiled, tokens, STEPS, hf_loss)
    _assert_every_rewritten_weight_got_gradient(model, report)
    _compare_curves(losses, _lm_losses(reference, reference, tokens, STEPS, hf_loss))
