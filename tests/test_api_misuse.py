"""Misused public API (issue 15, item 17): a clear one-line error, or the obvious meaning; never
a silent wrong default, never a bare AttributeError / IndexError from deep inside."""

import pytest
import torch
from torch import nn

import bitcompile
import reference_impl as ref
from bitcompile import PackedTernaryLinear, TernaryConfig, TernaryConfigError


def test_pack_accepts_an_options_dict_like_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    x = torch.randn(3, 64)
    expected = ref.ternary_linear_forward(x, model[0].weight.detach(), model[0].bias.detach(), 32, "int8")
    packed = bitcompile.pack(model, {"group_size": 32})
    assert isinstance(packed[0], PackedTernaryLinear) and packed[0].group_code == 32
    with torch.no_grad():
        torch.testing.assert_close(packed(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert [d.packed for d in bitcompile.plan_packing(nn.Sequential(nn.Linear(8, 8)), {"exclude": ["0"]})] == [False]


@pytest.mark.parametrize("config, message", [
    ({"grup_size": 32}, "unknown bitcpm option 'grup_size'"),
    ([("group_size", 32)], "pack: config must be a TernaryConfig or a dict of bitcpm options"),
    (32, "got int"),
])  # fmt: skip
def test_pack_rejects_a_bad_config_and_leaves_the_model_alone(config, message):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TernaryConfigError, match=message):
        bitcompile.pack(model, config)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("kwargs, message", [
    ({"pre_quantized": "yes"}, "pack: pre_quantized='yes' is invalid: expected 'auto', True or False"),
    ({"pre_quantized": 1}, "pack: pre_quantized=1 is invalid"),
    ({"pre_quantized": None}, "pack: pre_quantized=None is invalid"),
    ({"float_gemv": "no"}, "pack: float_gemv='no' is invalid: expected True or False"),
])  # fmt: skip
def test_pack_validates_its_flags(kwargs, message):
    """``pre_quantized="yes"`` used to be treated as False (the absmean quantizer), silently."""
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=message):
        bitcompile.pack(model, **kwargs)
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)], ids=["no inputs", "no outputs"])
def test_empty_linear_layer_stays_float_in_pack_and_compiler(shape):
    """``pack(nn.Sequential(nn.Linear(0, 4)))`` used to fail with an IndexError, the compiler with a reshape error."""
    with pytest.warns(UserWarning, match="zero-element"):
        model = nn.Sequential(nn.Linear(*shape))
    x = torch.randn(2, shape[0])
    expected = model(x).detach()
    reason = f"weight is empty ({shape[1]}x{shape[0]}): nothing to quantize"
    report = bitcompile.explain(model, x)
    assert [(d.rewritten, d.reason) for d in report.layers] == [(False, reason)]
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), expected)
    bitcompile.pack(model)
    assert not model.bitcompile_pack_plan[0].packed and model.bitcompile_pack_plan[0].reason.startswith(reason)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_load_packed_names_a_factory_that_returns_no_model(tmp_path):
    bitcompile.save_packed(bitcompile.pack(nn.Sequential(nn.Linear(8, 4))), tmp_path)
    with pytest.raises(TypeError, match=r"the model factory '<lambda>' returned NoneType, not an nn.Module"):
        bitcompile.load_packed(tmp_path, lambda: None)
    with pytest.raises(TypeError, match="expected the float model .* or a function building it, got str"):
        bitcompile.load_packed(tmp_path, "nn.Sequential")
    loaded = bitcompile.load_packed(tmp_path, lambda: nn.Sequential(nn.Linear(8, 4)))
    assert isinstance(loaded[0], PackedTernaryLinear)


def test_bitcompile_compile_takes_an_options_dict_and_checks_it_at_once():
    model = nn.Linear(16, 8)
    assert bitcompile.compile(model, {"group_size": 8, "inner": "eager"})(torch.randn(3, 16)).shape == (3, 8)
    with pytest.raises(TernaryConfigError, match="unknown bitcpm option 'grup_size'"):
        bitcompile.compile(model, {"grup_size": 8})  # before any call


@pytest.mark.parametrize("patterns", [{"lm_head": 1}, {"lm_head"}, (p for p in ["lm_head"]), 3, ["lm_head", 3]])
def test_exclude_and_include_must_be_a_string_or_a_list_of_them(patterns):
    """A dict used to be accepted (its keys taken as patterns), a generator silently became ()."""
    for key in ("exclude", "include"):
        with pytest.raises(TernaryConfigError, match=f"bitcpm option '{key}'=.* is invalid: expected a glob pattern"):
            TernaryConfig(**{key: patterns})
    assert TernaryConfig(exclude=["lm_head"], include=("*.mlp.*",)).exclude == ("lm_head",)
