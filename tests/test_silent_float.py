"""Options or wrappers that would make a model train (or pack) in float must say so (issue 15 item 7)."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile import BitcompileWarning


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x).relu())


class BrokenGraph(TwoLayers):
    def forward(self, x):
        x = self.a(x).relu()
        torch._dynamo.graph_break()
        return self.b(x)


def train_steps(model, steps=2, **options):
    """Compiled training steps; returns the BitcompileWarning messages they emitted (each one, every time)."""
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", **options})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            compiled(torch.randn(2, 16)).sum().backward()
    return [str(w.message) for w in caught if issubclass(w.category, BitcompileWarning)]


def test_include_that_matches_nothing_warns_once_that_training_is_float():
    messages = train_steps(TwoLayers(), include=["fc*"])
    assert len(messages) == 2, messages  # two steps, one compile: each warning once
    assert "include pattern 'fc*' matches no module or parameter of TwoLayers" in messages[0]
    assert "a training graph of TwoLayers has 2 linear layer(s) and none is ternary" in messages[1]
    assert "a: not matched by include patterns ['fc*']" in messages[1]


def test_misspelt_exclude_warns_and_correct_options_stay_quiet():
    assert train_steps(TwoLayers(), exclude=["lm_haed"]) == [
        "bitcpm: exclude pattern 'lm_haed' matches no module or parameter of TwoLayers; check its spelling"
    ]
    assert train_steps(TwoLayers(), exclude=["b"]) == []
    assert train_steps(BrokenGraph(), include=["b"]) == []  # 'b' is only in the second graph: still matched


def test_a_frame_split_by_a_graph_break_is_judged_as_a_whole():
    messages = train_steps(BrokenGraph(), include=["fc*"])
    assert [m for m in messages if "none is ternary" in m] == [
        "bitcpm: a training graph of BrokenGraph has 2 linear layer(s) and none is ternary, so it trains in float "
        "(a: not matched by include patterns ['fc*']; b: not matched by include patterns ['fc*'])"
    ]


def test_every_layer_too_small_warns_with_the_reason():
    messages = train_steps(TwoLayers(), min_features=32)
    assert len(messages) == 1 and "smaller than min_features=32" in messages[0]


def test_inference_compiles_do_not_warn_about_float_training():
    compiled = torch.compile(TwoLayers(), backend="bitcpm", options={"inner": "aot_eager", "min_features": 32})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        compiled(torch.randn(2, 16))
    assert not [w for w in caught if issubclass(w.category, BitcompileWarning)]


def test_pack_warns_when_a_pattern_matches_nothing_and_nothing_is_packed():
    with pytest.warns(BitcompileWarning) as caught:
        packed = bitcompile.pack(TwoLayers(), bitcompile.TernaryConfig(include=["fc*"]))
    messages = [str(w.message) for w in caught]
    assert any("none of the model's 2 linear layers is packed" in m for m in messages)
    assert any("include pattern 'fc*' matches none of the model's 2 linear layers (a, b)" in m for m in messages)
    assert not any(d.packed for d in packed.bitcompile_pack_plan)


def test_ddp_around_a_torch_nn_container_trains_ternary_through_bitcompile_compile():
    code = textwrap.dedent(
        """
        import os, socket, torch, torch.distributed as dist
        from torch import nn
        import bitcompile
        from bitcompile.backend import observe_compilations
        from torch.nn.parallel import DistributedDataParallel as DDP
        import reference_impl as ref
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        ddp = DDP(model)
        compiled = bitcompile.compile(ddp, bitcompile.TernaryConfig(inner="aot_eager", activations=None))
        x = torch.randn(3, 16)
        seen = []
        with observe_compilations(seen.append):
            y = compiled(x)
        y.sum().backward()
        expected = ref.fake_quant_linear(ref.fake_quant_linear(x, model[0].weight, model[0].bias, -1, None).relu(),
                                         model[2].weight, model[2].bias, -1, None)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        rewritten = sorted(d.name for r in seen for d in r.layers if d.rewritten)
        assert rewritten == ["0", "2"], rewritten
        assert list(compiled.state_dict())[0] == "module.0.weight"
        dist.destroy_process_group()
        print("ok")
        """
    )
    env = {**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
