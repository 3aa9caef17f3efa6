"""Compiler and ``pack`` agree on every model the test suite uses (issue 15).

For each model: the layers the compiler makes ternary (observed while the compiled model
runs, ``inner="aot_eager"``) are exactly the layers ``pack(example_inputs=...)`` packs, and
the packed model computes what the compiled QAT model computes, to kernel rounding. The
module-tree plan (``pack`` without example inputs) agrees too, except where only the forward
shows the difference (a layer called twice, a weight read elsewhere), which each case states.

Models whose compiled layers include bare parameters (``x @ self.w``) keep those float in
``pack``, which replaces modules only; ``pack`` warns, and the outputs are compared with
those parameters excluded from the compiler too.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.backend import observe_compilations
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig
from test_discover import Nested, TransposeSpellings, Zoo
from test_onnx_export import ReluSquaredBlock
from test_pack import CalledTwice, Half, WeightNormalised, WeightReadElsewhere
from test_silent_float import BrokenGraph, TwoLayers

TOL = dict(rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class Case:
    build: Callable[[], tuple[nn.Module, tuple]]
    options: dict = dataclasses.field(default_factory=dict)
    bare_parameters: frozenset = frozenset()  # compiler layers that are not modules pack can replace
    forward_only: frozenset = frozenset()  # layers only example_inputs show must stay float


def hooked():
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    model[2].register_forward_pre_hook(lambda module, args: (args[0] - 1,))
    return model, (torch.randn(4, 32),)


def hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval(), (torch.randint(0, 50, (1, 10)),)


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, 50, (1, 12)),)


class IntLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randint(-3, 3, (4, 6)), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.t()


CASES = {
    "MLP": Case(lambda: (MLP(100, [72, 40], 10), (torch.randn(5, 100),))),
    "MLP, groups of 32, weight-only": Case(
        lambda: (MLP(100, [72, 40], 10), (torch.randn(5, 100),)), {"group_size": 32, "activations": None}
    ),
    "TinyLlama": Case(
        lambda: (TinyLlama(TinyLlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=100)).eval(),
                 (torch.randint(0, 40, (2, 12)),))
    ),  # fmt: skip
    "HF Llama (tied head)": Case(hf_llama),
    "HF GPT-2 (Conv1D)": Case(hf_gpt2),
    "Zoo (every candidate kind)": Case(
        lambda: (Zoo(), (torch.randint(0, 20, (2, 5)),)), bare_parameters=frozenset({"in_out", "mm_weight", "left"})
    ),
    "Nested (exclude, min_features)": Case(
        lambda: (Nested(), (torch.randn(2, 16),)), {"exclude": ["router"], "min_features": 4}
    ),
    "Nested (include)": Case(lambda: (Nested(), (torch.randn(2, 16),)), {"include": ["*.down_proj"]}),
    "LayerNorm MLP": Case(
        lambda: (nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16)), (torch.randn(3, 7, 16),))
    ),
    "every transpose spelling": Case(
        lambda: (TransposeSpellings(), (torch.randn(3, 16),)),
        bare_parameters=frozenset(f"weights.{n}" for n in TransposeSpellings.SPELLINGS),
    ),
    "integer weights": Case(lambda: (IntLinear(), (torch.randint(-3, 3, (2, 6)),))),
    "no linear layer": Case(lambda: (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 8, 8),))),
    "ReLU² block": Case(lambda: (ReluSquaredBlock(bias=True), (torch.randn(6, 64),))),
    "two layers": Case(lambda: (TwoLayers(), (torch.randn(2, 16),))),
    "graph break": Case(lambda: (BrokenGraph(), (torch.randn(2, 16),))),
    "Half (subclass forward)": Case(lambda: (nn.Sequential(nn.Linear(32, 32), nn.ReLU(), Half(32, 16)), (torch.randn(4, 32),))),
    "weight-normalised subclass": Case(
        lambda: (nn.Sequential(nn.Linear(32, 32), nn.ReLU(), WeightNormalised(32, 16)), (torch.randn(4, 32),))
    ),
    "forward hooks": Case(hooked),
    "layer called twice": Case(lambda: (CalledTwice(), (torch.randn(4, 32),)), forward_only=frozenset({"fc"})),
    "weight read elsewhere": Case(lambda: (WeightReadElsewhere(), (torch.randn(4, 32),)), forward_only=frozenset({"fc"})),
}


def logits(output):
    return output.logits if hasattr(output, "logits") else output


def compiled_run(model, inputs, options):
    """The compiled QAT model's output (no grad) and the layers the compiler made ternary."""
    seen = []
    torch._dynamo.reset()
    with observe_compilations(seen.append), torch.no_grad():
        out = logits(torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", **options})(*inputs))
    torch._dynamo.reset()
    return out, {d.name for record in seen for d in record.layers if d.rewritten and d.kind != "packed"}


@pytest.mark.parametrize("case_name", list(CASES))
def test_compiler_and_pack_select_the_same_layers_and_compute_the_same(case_name):
    case = CASES[case_name]
    torch.manual_seed(0)
    model, inputs = case.build()
    config = bitcompile.TernaryConfig(**case.options)
    expected, compiler_layers = compiled_run(model, inputs, case.options)

    module_tree_plan = {d.name for d in bitcompile.plan_packing(model, config) if d.packed}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = bitcompile.pack(copy.deepcopy(model), config, example_inputs=inputs)
    packed_layers = {d.name for d in packed.bitcompile_pack_plan if d.packed}

    assert packed_layers == compiler_layers - case.bare_parameters
    assert module_tree_plan == packed_layers | case.forward_only
    pack_warned = any("that pack keeps float" in str(w.message) for w in caught)
    assert pack_warned == bool(case.bare_parameters)

    if case.bare_parameters:  # compare with them float in the compiled model too
        excluded = {**case.options, "exclude": [*case.options.get("exclude", ()), *case.bare_parameters]}
        expected, _ = compiled_run(model, inputs, excluded)
    with torch.no_grad():
        torch.testing.assert_close(logits(packed(*inputs)), expected, **TOL)
