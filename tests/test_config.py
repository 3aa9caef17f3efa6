import pytest
import torch

import bitcompile
from bitcompile import TernaryConfig, TernaryConfigError
from bitcompile.kernels.groups import ScaleGroups


def test_defaults():
    cfg = TernaryConfig()
    assert (cfg.group_size, cfg.activations, cfg.target, cfg.inner) == (ScaleGroups.per_row(), "int8", "auto", "inductor")
    assert cfg.group_code == -1 and cfg.quantize_activations


def test_from_options_parses_and_is_frozen():
    cfg = TernaryConfig.from_options(
        {"group_size": "tensor", "activations": None, "exclude": "lm_head", "include": ["*.mlp.*"], "min_features": 8}
    )
    assert cfg.group_code == 0 and not cfg.quantize_activations
    assert cfg.exclude == ("lm_head",) and cfg.include == ("*.mlp.*",)
    with pytest.raises(Exception):
        cfg.group_size = 32  # frozen
    assert TernaryConfig.from_options(cfg.to_options()) == cfg


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"group_sise": 32}, ["'group_sise'", "32", "group_size"]),
        ({"group_size": 0}, ["'group_size'", "0", "-1", "'tensor'"]),
        ({"group_size": -4}, ["'group_size'", "-4"]),
        ({"group_size": "row"}, ["'group_size'", "'row'"]),
        ({"group_size": True}, ["'group_size'", "True"]),
        ({"group_size": 2**32 + 32}, ["'group_size'", "4294967328", "below 2**31"]),  # the C int would wrap to 32
        ({"group_size": 2**31}, ["'group_size'", "2147483648", "below 2**31"]),
        ({"group_size": 128.0}, ["'group_size'", "128.0"]),
        ({"group_size": "128"}, ["'group_size'", "'128'"]),
        ({"group_size": "Tensor"}, ["'group_size'", "'Tensor'"]),
        ({"group_size": None}, ["'group_size'", "None"]),
        ({"activations": "int4"}, ["'activations'", "'int4'", "'int8'"]),
        ({"target": "gpu"}, ["'target'", "'gpu'", "cann"]),
        ({"inner": "tvm"}, ["'inner'", "'tvm'", "inductor"]),
        ({"min_features": -1}, ["'min_features'", "-1"]),
        ({"exclude": 3}, ["'exclude'", "3"]),
    ],
)
def test_bad_options_name_key_value_and_allowed(options, fragments):
    with pytest.raises(TernaryConfigError) as info:
        TernaryConfig.from_options(options)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_option_through_torch_compile_raises_before_running():
    """Issue 15 item 16: the error is a TernaryConfigError with its one-line message, not Dynamo's
    BackendCompilerFailed. torch.compile stores ``options`` without calling the backend, so the
    first call of the compiled model is the earliest point it can be raised (see BackendOptionsError)."""
    model = torch.nn.Linear(8, 8)
    compiled = torch.compile(model, backend="bitcpm", options={"group_size": 0})
    with pytest.raises(TernaryConfigError) as info:
        compiled(torch.randn(2, 8))
    assert str(info.value) == str(_config_error({"group_size": 0}))
    assert not isinstance(info.value, torch._dynamo.exc.BackendCompilerFailed)
    with pytest.raises(TernaryConfigError) as info:
        torch.compile(torch.nn.Linear(8, 8), backend="bitcpm", options={"groups": 1})(torch.randn(2, 8))
    assert str(info.value).startswith("unknown bitcpm option 'groups'=1; allowed options:")
    assert "\n" not in str(info.value)


def _config_error(options) -> TernaryConfigError:
    with pytest.raises(TernaryConfigError) as info:
        TernaryConfig.from_options(options)
    return info.value


def test_python_api_compile_with_config():
    model = torch.nn.Linear(16, 8)
    compiled = bitcompile.compile(model, TernaryConfig(group_size=8, inner="eager"))
    assert compiled(torch.randn(3, 16)).shape == (3, 8)


@pytest.mark.parametrize(
    "spelling, kind, size, code, label",
    [
        (-1, "row", 0, -1, "per-row"),
        ("tensor", "tensor", 0, 0, "per-tensor"),
        (1, "group", 1, 1, "groups of 1"),
        (128, "group", 128, 128, "groups of 128"),
        (2**31 - 1, "group", 2**31 - 1, 2**31 - 1, "groups of 2147483647"),
        (ScaleGroups.of(64), "group", 64, 64, "groups of 64"),
        (ScaleGroups.per_tensor(), "tensor", 0, 0, "per-tensor"),
    ],
)
def test_group_size_spellings_become_one_scale_groups_value(spelling, kind, size, code, label):
    groups = TernaryConfig(group_size=spelling).group_size
    assert isinstance(groups, ScaleGroups) and (groups.kind, groups.size) == (kind, size)
    assert (groups.code, groups.label) == (code, label)
    assert ScaleGroups.from_code(groups.code) == groups == ScaleGroups.parse(spelling)
    # to_options writes the option's spelling (JSON, checkpoints), which parses back to the same value
    assert TernaryConfig.from_options(TernaryConfig(group_size=spelling).to_options()).group_size == groups
    assert TernaryConfig(group_size=spelling).to_options()["group_size"] in (-1, "tensor", size)
    assert TernaryConfig(group_size=spelling).group_code == code


def test_scale_groups_refuses_inconsistent_fields_and_codes():
    for kind, size in (("group", 0), ("group", -4), ("row", 8), ("tensor", -1), ("rows", 0), ("group", True)):
        with pytest.raises(ValueError, match="is invalid"):
            ScaleGroups(kind, size)
    for code in (-2, 2**31):
        with pytest.raises(ValueError, match=f"group_size code {code} is invalid"):
            ScaleGroups.from_code(code)
    assert repr(ScaleGroups.of(128)) == "ScaleGroups(kind='group', size=128)"
