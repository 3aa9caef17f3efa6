"""Defaults that follow the ternary recipes (issue 16): output heads and MoE routers stay float
unless ``float_roles`` lets them in; embeddings are listed float; each says why in ``explain``.
The explain table stays readable at 80 columns."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile import TernaryConfig
from bitcompile.config import TernaryConfigError
from bitcompile.passes.discover import EMBEDDING_REASON
from bitcompile.policy import ROLE_REASONS

transformers = pytest.importorskip("transformers")


def _mixtral(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config).eval()


def _reasons(report) -> dict[str, tuple[bool, str]]:
    return {layer.name: (layer.rewritten, layer.reason) for layer in report.layers}


@pytest.fixture(scope="module")
def mixtral_reports():
    model = _mixtral()
    ids = torch.randint(0, 96, (1, 8))
    default = bitcompile.explain(model, ids, inner="aot_eager")
    opted_in = bitcompile.explain(model, ids, inner="aot_eager", float_roles=[])
    return default, opted_in


def test_router_head_and_embedding_stay_float_by_default_with_their_reasons(mixtral_reports):
    rows = _reasons(mixtral_reports[0])
    assert rows["model.layers.0.mlp.gate"] == (False, ROLE_REASONS["router"])
    assert rows["lm_head"] == (False, ROLE_REASONS["head"])  # untied: it was ternary before issue 16
    assert rows["model.embed_tokens"] == (False, EMBEDDING_REASON)
    assert rows["model.layers.0.self_attn.q_proj"][0] is True


def test_float_roles_empty_makes_router_and_head_ternary(mixtral_reports):
    rows = _reasons(mixtral_reports[1])
    assert rows["model.layers.0.mlp.gate"][0] is True and rows["lm_head"][0] is True
    assert rows["model.embed_tokens"] == (False, EMBEDDING_REASON)  # no ternary embedding lookup exists


def test_a_tied_head_says_it_is_shared_whatever_float_roles_says():
    model = _mixtral(tie=True)
    report = bitcompile.explain(model, torch.randint(0, 96, (1, 8)), inner="aot_eager", float_roles=[])
    rewritten, reason = _reasons(report)["lm_head"]
    assert not rewritten and "shared with an embedding" in reason


class TopKRouted(nn.Module):
    """A plain-PyTorch MoE-style block: the router is an ordinary nn.Linear named ``pick``,
    recognised only because its output feeds a topk (what the graph shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = nn.Linear(32, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = torch.topk(torch.softmax(self.pick(x).float(), -1), 2, dim=-1)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (..., 4, 32)
        chosen = torch.gather(outs, -2, index.unsqueeze(-1).expand(*index.shape, 32))
        return (chosen * weights.unsqueeze(-1)).sum(-2)


def test_a_linear_feeding_topk_is_a_router_for_compile_and_pack():
    torch.manual_seed(0)
    model = TopKRouted().eval()
    x = torch.randn(3, 32)
    rows = _reasons(bitcompile.explain(model, x, inner="aot_eager"))
    assert rows["pick"] == (False, ROLE_REASONS["router"])
    assert all(rows[f"experts.{i}"][0] for i in range(4))
    packed = bitcompile.pack(model, example_inputs=(x,))
    plan = {d.name: d for d in packed.bitcompile_pack_plan}
    assert not plan["pick"].packed and ROLE_REASONS["router"] in plan["pick"].reason
    assert type(packed.pick) is not bitcompile.PackedTernaryLinear
    assert all(isinstance(packed.experts[i], bitcompile.PackedTernaryLinear) for i in range(4))


def test_pack_keeps_an_untied_head_float_by_default_and_packs_it_when_asked():
    model = _mixtral()
    head = model.lm_head.weight.detach().clone()
    packed = bitcompile.pack(model)
    assert type(packed.lm_head) is not bitcompile.PackedTernaryLinear
    assert torch.equal(packed.lm_head.weight, head)
    assert dict((d.name, d.reason) for d in packed.bitcompile_pack_plan)["lm_head"].startswith(ROLE_REASONS["head"])
    opted = bitcompile.pack(_mixtral(), TernaryConfig(float_roles=()))
    assert isinstance(opted.lm_head, bitcompile.PackedTernaryLinear)


def test_int8_head_needs_no_exclude_now_and_float_roles_still_refuses_a_ternary_head():
    model = bitcompile.pack(_mixtral(), head="int8")  # an explicit user choice: int8, not float
    assert type(model.lm_head).__name__ == "Int8Linear"
    with pytest.raises(ValueError, match="would be packed ternary"):
        bitcompile.pack(_mixtral(), TernaryConfig(float_roles=()), head="int8")


@pytest.mark.parametrize("bad", ["heads", ["head", "embedding"], 3])
def test_float_roles_rejects_unknown_roles(bad):
    with pytest.raises(TernaryConfigError, match="float_roles"):
        TernaryConfig(float_roles=bad)


def test_float_roles_round_trips_through_options():
    config = TernaryConfig.from_options({"float_roles": ["router"]})
    assert config.float_roles == ("router",)
    assert TernaryConfig.from_options(config.to_options()) == config
    assert TernaryConfig().float_roles == ("head", "router")


def _row_heights(text: str) -> list[int]:
    """Lines per body row of a rich table: a row starts where its (never wrapped) shape cell is set."""
    lines = text.splitlines()
    body = lines[next(i for i, l in enumerate(lines) if l.startswith("┡")) + 1 : next(i for i, l in enumerate(lines) if l.startswith("└"))]
    starts = [i for i, line in enumerate(body) if line.split("│")[2].strip()]
    return [b - a for a, b in zip(starts, [*starts[1:], len(body)])]


def test_explain_table_rows_take_at_most_two_lines_at_80_columns():
    from rich.console import Console

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    report = bitcompile.explain(transformers.LlamaForCausalLM(config), torch.randint(0, 96, (1, 8)), inner="aot_eager")
    console = Console(file=io.StringIO(), width=80, color_system=None)
    report.render(console)
    text = console.file.getvalue()
    heights = _row_heights(text)
    assert len(heights) == len(report.layers) == 16  # embedding + 2 x 7 + lm_head
    assert max(heights) <= 2, text
    assert all(len(line) <= 80 for line in text.splitlines())
    for reason in {layer.reason for layer in report.layers}:  # each reason once, as a numbered note
        assert text.count(reason) == 1
