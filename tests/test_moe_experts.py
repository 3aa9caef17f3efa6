"""Ternary MoE experts (issue 16, item 1): the op, QAT on Mixtral / Qwen3-MoE, pack, save/load, export.

The reference is the tests' own (tests/reference_impl.py, DESIGN.md §3): each expert is fake
quantized on its own (per row, per group, or one scale per expert), activations per token,
straight-through gradients written as ``w + (q(w) - w).detach()``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import bitcompile
from bitcompile.export.results import OnnxExportError
from bitcompile.runtime.checkpoint_format import CheckpointError
from bitcompile.runtime.experts import PackedTernaryExperts
from tests.reference_impl import fake_quant_linear, fake_quant_weight

transformers = pytest.importorskip("transformers")

ONLY_EXPERTS = {"inner": "aot_eager", "include": ["*experts*"]}  # every other layer float: the reference needs only experts


def reference_experts_linear(x, weight, expert_ids, group_size, activations):
    """Routed rows through their expert's fake-quantized weight (STE), row by row of each expert."""
    y = x.new_zeros(x.shape[0], weight.shape[1])
    for expert in range(weight.shape[0]):
        rows = (expert_ids == expert).nonzero().flatten()
        if len(rows):
            y = y.index_put((rows,), fake_quant_linear(x[rows], weight[expert], None, group_size, activations))
    return y


def reference_experts_forward(module, hidden_states, top_k_index, top_k_weights, group_size="tensor", activations="int8"):
    """transformers' experts forward (gate_up, act(gate) * up, down, router weights) on fake-quant experts."""
    top_k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1)
    rows = hidden_states.repeat_interleave(top_k, dim=0)
    gate, up = reference_experts_linear(rows, module.gate_up_proj, ids, group_size, activations).chunk(2, dim=-1)
    out = reference_experts_linear(module.act_fn(gate) * up, module.down_proj, ids, group_size, activations)
    out = out * top_k_weights.reshape(-1, 1)
    return out.view(hidden_states.shape[0], top_k, -1).sum(dim=1)


def tiny_mixtral(implementation="grouped_mm"):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM._from_config(config, experts_implementation=implementation)


def tiny_qwen3_moe(implementation="grouped_mm"):
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM._from_config(config, experts_implementation=implementation)


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}


def experts_of(model):
    return [m for m in model.modules() if all(isinstance(m._parameters.get(w), torch.nn.Parameter) for w in ("gate_up_proj", "down_proj"))]


# ---------------------------------------------------------------------------------------------
# the op against the reference


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("group_size", [-1, "tensor", 8])
@pytest.mark.parametrize("activations", ["int8", None])
def test_ternary_experts_linear_matches_per_expert_reference(kernel, group_size, activations):
    if kernel == "cpu" and not bitcompile.kernels.cpu.available():
        pytest.skip("the C kernels are not built")
    code = {"tensor": 0}.get(group_size, group_size)
    weight = torch.randn(4, 6, 20, requires_grad=True)
    x = torch.randn(11, 20, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 3, 3, 0, 2, 2, 4, 0, 3])  # expert 1 idle, id 4 (= E) is a sentinel row
    y = torch.ops.bitcpm.ternary_experts_linear(x, weight, ids, code, activations == "int8", kernel)[0]
    grad = torch.randn_like(y)
    (y * grad).sum().backward()

    w_ref, x_ref = weight.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y_ref = reference_experts_linear(x_ref, w_ref, ids, group_size, activations)
    (y_ref * grad).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(y[8] == 0) and torch.all(x.grad[8] == 0)  # the sentinel row: no expert
    assert torch.all(weight.grad[1] == 0)  # the idle expert


def test_each_expert_has_its_own_tensor_scale():
    # expert 1 is 100x larger: one scale shared across experts would zero expert 0's codes
    weight = torch.cat([torch.randn(1, 4, 8), 100 * torch.randn(1, 4, 8)])
    x = torch.randn(2, 8)
    codes = torch.ops.bitcpm.ternary_experts_linear(x, weight, torch.tensor([0, 1]), 0, True, "reference")[3]
    for expert in range(2):
        expected = fake_quant_weight(weight[expert], "tensor")
        scale = weight[expert].abs().mean()
        torch.testing.assert_close(codes[expert].float() * scale, expected)


def test_ternary_experts_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"ternary_experts_linear: weight must be 3-D \(experts, out, in\)"):
        torch.ops.bitcpm.ternary_experts_linear(torch.randn(2, 8), torch.randn(4, 8), torch.tensor([0, 1]), -1, True, "reference")
    with pytest.raises(ValueError, match=r"input must be 2-D \(rows, 8\)"):
        torch.ops.bitcpm.ternary_experts_linear(torch.randn(2, 6), torch.randn(3, 4, 8), torch.tensor([0, 1]), -1, True, "reference")
    with pytest.raises(ValueError, match="expert_ids must be 1-D integers, one per input row"):
        torch.ops.bitcpm.ternary_experts_linear(torch.randn(2, 8), torch.randn(3, 4, 8), torch.tensor([0.0, 1.0]), -1, True, "reference")


# ---------------------------------------------------------------------------------------------
# QAT on the tiny models


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_qat_experts_match_reference_and_explain_lists_them(name):
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    for module in experts_of(reference):
        module.forward = functools.partial(reference_experts_forward, module)
    ids = torch.randint(0, 64, (2, 6))
    compiled = torch.compile(model, backend="bitcpm", options={**ONLY_EXPERTS, "group_size": "tensor"})
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    loss_ref = reference(ids, labels=ids).loss
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for module, module_ref in zip(experts_of(model), experts_of(reference)):
        for weight in ("gate_up_proj", "down_proj"):
            torch.testing.assert_close(getattr(module, weight).grad, getattr(module_ref, weight).grad, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the latent weights are not touched

    report = bitcompile.explain(MODELS[name](), ids, include=["*experts*"])
    rows = [layer for layer in report.layers if layer.kind == "experts"]
    assert [r.name for r in rows] == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    assert all(r.rewritten and r.num_experts == 4 for r in rows)
    assert (rows[0].out_features, rows[0].in_features) == (32, 32) and (rows[1].out_features, rows[1].in_features) == (32, 16)
    assert rows[0].reason.startswith("4 experts of (32, 32): ternary per expert (per-row scales), int8 activations, grouped_mm")
    assert report.to_json()["graphs"][0]["layers"][-1]["num_experts"] == 4


def test_batched_mm_experts_train_like_grouped_mm():
    ids = torch.randint(0, 64, (2, 5))
    results = []
    for implementation in ("grouped_mm", "batched_mm"):
        torch._dynamo.reset()
        model = tiny_mixtral(implementation)
        loss = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[1].mlp.experts.down_proj.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_excluded_experts_stay_float_with_their_reason():
    report = bitcompile.explain(tiny_mixtral(), torch.randint(0, 64, (1, 4)), exclude=["*experts.down_proj"])
    down = [layer for layer in report.layers if layer.name.endswith("experts.down_proj")]
    assert len(down) == 2 and not any(layer.rewritten for layer in down)
    assert down[0].reason == "4 experts of (32, 16): excluded by pattern '*experts.down_proj'"


# ---------------------------------------------------------------------------------------------
# pack, save / load, export


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_packed_experts_match_qat_in_eval_and_load_exactly(name, tmp_path):
    ids = torch.randint(0, 64, (2, 7))
    # the router is no nn.Linear: pack keeps it float, so the QAT graph must too
    qat = torch.compile(MODELS[name]().eval(), backend="bitcpm", options={"exclude": ["*.mlp.gate"], "inner": "aot_eager"})
    with torch.no_grad():
        expected = qat(ids).logits
    packed = bitcompile.pack(MODELS[name]().eval())
    assert sum(isinstance(m, PackedTernaryExperts) for m in packed.modules()) == 2
    assert not experts_of(packed)  # no float expert weight left
    rows = [d for d in packed.bitcompile_pack_plan if ".experts." in d.name]
    assert len(rows) == 4 and all(d.packed for d in rows)
    with torch.no_grad():
        got = packed(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    bitcompile.save_packed(packed, tmp_path)
    loaded = bitcompile.load_packed(tmp_path, lambda: MODELS[name]().eval())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
    for key, value in packed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_packed_refusal_leaves_float_experts_in_place(tmp_path):
    bitcompile.save_packed(bitcompile.pack(tiny_mixtral()), tmp_path)
    config = tiny_mixtral().config
    config.intermediate_size = 8  # other expert shapes
    other = transformers.MixtralForCausalLM._from_config(config)
    experts_before = other.model.layers[0].mlp.experts
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj\.0'?: checkpoint has \(out, in\) = \(32, 32\)"):
        bitcompile.load_packed(tmp_path, other)
    assert other.model.layers[0].mlp.experts is experts_before


def test_pack_keeps_excluded_experts_float():
    model = bitcompile.pack(tiny_mixtral(), {"exclude": ["*experts.gate_up_proj"]})
    assert len(experts_of(model)) == 2
    rows = {d.name: d for d in model.bitcompile_pack_plan}
    assert rows["model.layers.0.mlp.experts.down_proj"].reason == (
        "4 experts: gate_up_proj: excluded by pattern '*experts.gate_up_proj'"
    )


def test_export_onnx_refuses_moe_in_one_line(tmp_path):
    with pytest.raises(OnnxExportError) as error:
        bitcompile.export_onnx(tiny_mixtral(), (torch.randint(0, 64, (1, 4)),), tmp_path / "m.onnx")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("export_onnx: MoE layer 'model.layers.0.mlp.experts' (2 in the model) cannot be exported")


def test_packed_decode_path_matches_grouped_path(monkeypatch):
    import bitcompile.runtime.experts as experts_module

    packed = bitcompile.pack(tiny_mixtral().eval()).model.layers[0].mlp.experts
    x = torch.randn(3, 32)
    index = torch.tensor([[1, 3], [3, 0], [2, 1]])
    weights = torch.rand(3, 2)
    with torch.no_grad():
        row_by_row = packed(x, index, weights)  # 6 routed rows: the decode path
        monkeypatch.setattr(experts_module, "DECODE_ROWS", 0)
        grouped = packed(x, index, weights)
    assert torch.equal(row_by_row, grouped)


def test_explain_warns_when_eager_experts_never_reach_a_graph():
    with pytest.warns(bitcompile.BitcompileWarning, match=r"MoE experts model\.layers\.0\.mlp\.experts, model\.layers\.1\.mlp\.experts \(2 module\(s\)\) never reached a compiled graph \(experts_implementation='eager'"):
        report = bitcompile.explain(tiny_mixtral("eager"), torch.randint(0, 64, (1, 4)))
    assert not [layer for layer in report.layers if layer.kind == "experts"]
