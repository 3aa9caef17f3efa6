"""Which layers the passes find, what they decide and why, and that the rewrite computes the right thing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
import reference_impl as ref
from bitcompile.passes.names import dotted_path


class Conv1D(nn.Module):
    """GPT-2 style: weight stored (in, out), applied with addmm."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class Zoo(nn.Module):
    """One of every candidate kind, plus things that must be left alone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 32)
        self.in_out = nn.Parameter(torch.randn(32, 24) * 0.1)  # x @ W, (in, out) layout
        self.conv1d = Conv1D(24, 16)
        self.mm_weight = nn.Parameter(torch.randn(16, 16) * 0.1)  # torch.mm(x, W)
        self.left = nn.Parameter(torch.randn(8, 16) * 0.1)  # W @ x
        self.register_buffer("buffer_weight", torch.randn(16, 16))
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        x = self.embed(tokens)  # (B, S, 16)
        x = F.gelu(self.fc(x)) @ self.in_out  # (B, S, 24)
        x = self.conv1d(x)  # (B, S, 16)
        x2 = torch.mm(x.reshape(-1, 16), self.mm_weight).view_as(x)
        x = x + F.linear(x2, self.buffer_weight)  # buffer weight: left alone
        scores = x @ x.transpose(-1, -2)  # activation @ activation: not a layer
        x = x + F.linear(x, x[0]).mean(-1, keepdim=True) + scores.mean(-1, keepdim=True)  # activation as weight
        side = (self.left @ x.transpose(-1, -2)).sum()  # W @ x
        return self.head(x) + side


def decisions_by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_zoo_decisions_and_reasons():
    model = Zoo()
    report = bitcompile.explain(model, torch.randint(0, 20, (2, 5)))
    layers = decisions_by_name(report)
    assert {n for n, d in layers.items() if d.rewritten} == {"fc", "in_out", "conv1d", "mm_weight", "left"}
    assert layers["in_out"].layout == "in_out" and (layers["in_out"].out_features, layers["in_out"].in_features) == (24, 32)
    assert layers["conv1d"].kind == "addmm" and layers["conv1d"].layout == "in_out"
    assert layers["left"].layout == "left"
    assert "embedding at embed" in layers["head"].reason
    skipped = [d for d in report.layers if not d.rewritten]
    reasons = " | ".join(d.reason for d in skipped)
    assert "buffer or constant tensor, not an nn.Parameter" in reasons
    assert "activation computed in the graph" in reasons
    assert len(report.layers) == 9  # the embedding is listed; the activation @ activation matmul is not a candidate
    assert [(d.kind, d.rewritten, d.reason) for d in report.layers if d.name == "embed"] == [
        ("embedding", False, "embedding: float (lookup table; recipes keep it)")
    ]
    assert report.graph_count == 1 and report.graph_break_count == 0


def test_zoo_compiled_values_match_reference_substitution():
    """Compiled output equals the same model with every rewritten weight replaced by its fake-quant value."""
    model = Zoo()
    tokens = torch.randint(0, 20, (2, 5))
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", "activations": None})
    got = compiled(tokens)
    expected_model = Zoo()
    expected_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected_model.fc.weight.copy_(ref.fake_quant_weight(model.fc.weight, -1))
        expected_model.in_out.copy_(ref.fake_quant_weight(model.in_out.t(), -1).t())
        expected_model.conv1d.weight.copy_(ref.fake_quant_weight(model.conv1d.weight.t(), -1).t())
        expected_model.mm_weight.copy_(ref.fake_quant_weight(model.mm_weight.t(), -1).t())
        expected_model.left.copy_(ref.fake_quant_weight(model.left, -1))
    torch.testing.assert_close(got, expected_model(tokens), rtol=1e-4, atol=1e-4)
    got.sum().backward()
    for name in ("fc.weight", "in_out", "conv1d.weight", "mm_weight", "left"):
        assert model.get_parameter(name).grad is not None, name
        assert model.get_parameter(name).grad.abs().sum() > 0, name


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"mlp": nn.ModuleDict({"up_proj": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})})
            for _ in range(3)
        )
        self.router = nn.Linear(16, 4)
        self.tiny = nn.Linear(16, 2)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"]["down_proj"](F.relu(layer["mlp"]["up_proj"](x)))
        return self.router(x).sum(-1) + self.tiny(x).sum(-1)


def test_module_paths_exclude_include_and_min_features():
    report = bitcompile.explain(Nested(), torch.randn(2, 16), exclude=["router"], min_features=4)
    layers = decisions_by_name(report)
    assert set(layers) == {f"layers.{i}.mlp.{p}" for i in range(3) for p in ("up_proj", "down_proj")} | {"router", "tiny"}
    assert layers["router"].reason == "excluded by pattern 'router'"
    assert layers["tiny"].reason.startswith("smaller than min_features=4")
    assert all(layers[f"layers.{i}.mlp.up_proj"].rewritten for i in range(3))

    only_down = bitcompile.explain(Nested(), torch.randn(2, 16), include="*.down_proj")
    rewritten = {d.name for d in only_down.rewritten}
    assert rewritten == {f"layers.{i}.mlp.down_proj" for i in range(3)}
    assert "not matched by include patterns" in decisions_by_name(only_down)["router"].reason


def test_dotted_path_parsing():
    assert dotted_path("L['self']._modules['layers']._modules['3']._modules['mlp']._parameters['weight']") == "layers.3.mlp.weight"
    assert dotted_path("L['self'].model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"
    assert dotted_path("L['self'].blocks[2].attn") == "blocks.2.attn"
    assert dotted_path("L['self']") == ""
    assert dotted_path("L['args'][0]._modules['model']._parameters['w']") == "model.w"


def test_no_linear_layers_is_fine_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    report = bitcompile.explain(model, torch.randn(1, 3, 8, 8))
    assert report.layers == [] and report.totals()["rewritten"] == 0
    assert "No linear layers found" in str(report)
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(compiled(x), model(x))


def test_integer_model_is_left_alone():
    class IntLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randint(-3, 3, (4, 6)), requires_grad=False)

        def forward(self, x):
            return x @ self.weight.t()

    model = IntLinear()
    x = torch.randint(-3, 3, (2, 6))
    report = bitcompile.explain(model, x)
    assert [d.reason for d in report.layers] == ["weight dtype torch.int64 is not floating point"]
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    assert torch.equal(compiled(x), model(x))


def test_pass_is_idempotent_and_dynamic_shapes_compile_once():
    from bitcompile.backend import observe_compilations

    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
    seen = []
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"}, dynamic=True)
    with observe_compilations(seen.append):
        for batch, seq in [(2, 8), (3, 17), (5, 64), (4, 7), (8, 32)]:
            x = torch.randn(batch, seq, 16, requires_grad=True)
            y = compiled(x)
            y.sum().backward()
            torch.testing.assert_close(
                y, ref.fake_quant_linear(F.silu(ref.fake_quant_linear(model[0](x), model[1].weight, model[1].bias, -1, "int8")),
                                         model[3].weight, model[3].bias, -1, "int8"), rtol=1e-4, atol=1e-4)
    # Dynamo may call the backend twice for the first frame under dynamic=True; each call rewrites both layers.
    assert {r.compile_id for r in seen} == {seen[0].compile_id}
    assert all(sum(d.rewritten for d in r.layers) == 2 for r in seen)
    assert all(r.after.count("bitcpm.ternary_linear") == 2 for r in seen)


def test_graph_breaks_give_several_rewritten_graphs():
    class Breaking(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    model = Breaking()
    report = bitcompile.explain(model, torch.randn(2, 8))
    assert report.graph_count == 2 and report.graph_break_count == 1
    assert report.graph_break_reasons and all(len(g.layers) == 1 and g.layers[0].rewritten for g in report.graphs)
    assert [g.layers[0].name for g in report.graphs] == ["a", "b"]


class WeightFirst(nn.Module):
    """``W @ x`` / ``W.t() @ x`` with the weight as matmul's left operand (issue 15, item 13)."""

    def __init__(self, transposed: bool):
        super().__init__()
        self.transposed = transposed
        shape = (16, 8) if transposed else (8, 16)  # (out, in) = (8, 16) either way
        self.w = nn.Parameter(torch.randn(*shape) * 0.1)

    def weight_out_in(self):
        return self.w.t() if self.transposed else self.w

    def forward(self, x):
        return (self.w.t() if self.transposed else self.w) @ torch.relu(x)  # x is an activation, not a graph input




@pytest.mark.parametrize("transposed", [False, True], ids=["W@x", "W.t()@x"])
@pytest.mark.parametrize("x_shape", [(16,), (16, 5), (3, 16, 5)], ids=["vector", "matrix", "batched"])
def test_weight_first_matmul_matches_reference_ternary(transposed, x_shape):
    """``W @ v`` with a 1-D ``v`` used to fail with an IndexError from the rewritten graph, and
    ``W.t() @ X`` with a matrix ``X`` with a shape error: each token (column of ``x``) must be
    quantized and multiplied like ``F.linear(x_token, W)``."""
    torch.manual_seed(0)
    model = WeightFirst(transposed)
    x = torch.randn(*x_shape, requires_grad=True)
    report = bitcompile.explain(model, x)
    assert [d.rewritten for d in report.layers] == [True], report.layers[0].reason
    assert (report.layers[0].out_features, report.layers[0].in_features) == (8, 16)
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    got = compiled(x)
    tokens = torch.relu(x) if len(x_shape) == 1 else torch.relu(x).transpose(-1, -2)
    expected = ref.ternary_linear_forward(tokens.detach(), model.weight_out_in().detach(), None, -1, "int8")
    expected = expected if len(x_shape) == 1 else expected.transpose(-1, -2)
    assert got.shape == model(x).shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.shape == x.shape


def test_weight_first_matmul_with_a_vector_freezes():
    model = WeightFirst(transposed=False).eval()
    v = torch.randn(16)
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", "freeze": True})
    with torch.no_grad():
        got = compiled(v)
    expected = ref.ternary_linear_forward(torch.relu(v), model.w.detach(), None, -1, "int8")
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


class TransposeSpellings(nn.Module):
    """Every way of writing ``x @ W^T`` with an (out, in) parameter, each applied to the model input."""

    SPELLINGS = {
        "t": lambda w: w.t(),
        "T": lambda w: w.T,
        "mT": lambda w: w.mT,
        "transpose01": lambda w: w.transpose(0, 1),
        "transpose_neg": lambda w: w.transpose(-1, -2),
        "permute10": lambda w: w.permute(1, 0),
        "torch_transpose": lambda w: torch.transpose(w, 0, 1),
    }

    def __init__(self):
        super().__init__()
        self.weights = nn.ParameterDict({name: nn.Parameter(torch.randn(8, 16) * 0.1) for name in self.SPELLINGS})

    def forward(self, x):
        return sum(x @ spell(self.weights[name]) for name, spell in self.SPELLINGS.items())


def test_every_transpose_spelling_is_rewritten_like_t_and_the_input_is_never_the_weight():
    model = TransposeSpellings()
    x = torch.randn(3, 16)
    report = bitcompile.explain(model, x)
    layers = decisions_by_name(report)
    assert set(layers) == {f"weights.{name}" for name in model.SPELLINGS}
    assert all(d.rewritten and d.layout == "out_in" and (d.out_features, d.in_features) == (8, 16) for d in layers.values())
    assert all(d.weight_name == d.name for d in layers.values())  # never the input "l_x_"

    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", "activations": None})
    expected = sum(ref.fake_quant_linear(x, w, None, -1, None) for w in model.weights.values())
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_matmul_of_two_inputs_is_not_a_layer():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x @ y.T

    report = bitcompile.explain(TwoInputs(), torch.randn(3, 16), torch.randn(8, 16))
    assert report.layers == []


@pytest.mark.parametrize(("group_size", "label"), [(-1, "per-row"), ("tensor", "per-tensor"), (8, "groups of 8")])
def test_scale_group_label_is_spelled_like_the_reason(group_size, label):
    """The report's group-size column and the decision's reason name the grouping one way."""
    from bitcompile.inspect.records import scale_groups

    report = bitcompile.explain(nn.Sequential(nn.Linear(16, 16)), torch.randn(2, 16), group_size=group_size)
    (layer,) = report.rewritten
    assert scale_groups(layer) == label and f"({label} scales)" in layer.reason
    assert label in str(report)


@pytest.mark.parametrize(
    "kind, groups, written",
    [
        ("linear", bitcompile.ScaleGroups.per_row(), -1),
        ("linear", bitcompile.ScaleGroups.per_tensor(), "tensor"),
        ("packed", bitcompile.ScaleGroups.of(128), 128),
        ("int8", bitcompile.ScaleGroups.per_row(), "row"),  # docs/report_schema.md: the int8 head's spelling
    ],
)
def test_decision_json_writes_the_options_spelling_of_its_scale_groups(kind, groups, written):
    from bitcompile.passes.discover import LayerDecision

    decision = LayerDecision(
        name="fc", weight_name="fc.weight", kind=kind, layout="(out, in)", out_features=8, in_features=256,
        dtype="float32", rewritten=kind != "int8", rationale="why", group_size=groups, fp_bytes=0, packed_bytes=0,
    )  # fmt: skip
    row = decision.to_json()
    assert row["group_size"] == written and decision.group_code == groups.code
