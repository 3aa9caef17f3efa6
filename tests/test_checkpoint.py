"""save_packed / load_packed against hostile input: ties, dtype conversions, wrappers, malformed
metadata, oversized declared shapes and group sizes. Every refusal is one CheckpointError line
naming the layer or tensor, and leaves the user's model as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bitcompile
from bitcompile import CheckpointError, PackedTernaryLinear, TernaryConfig
from bitcompile.kernels.groups import ScaleGroups
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear


def _llama(tie=True, seed=0):
    torch.manual_seed(seed)
    config = TinyLlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=64, num_layers=1, tie_embeddings=tie)
    return TinyLlama(config).eval()


def _mlp():
    return MLP(40, [24], 6)


def _read(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}


def _write(path, metadata, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def _snapshot(model):
    return [(name, type(m)) for name, m in model.named_modules()], copy.deepcopy(model.state_dict())


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True, msg=key)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --- item 3: an untied checkpoint into a tied model --------------------------------------------


def test_an_untied_checkpoint_does_not_load_into_a_tied_model(tmp_path):
    untied = bitcompile.pack(_llama(tie=False), TernaryConfig(exclude=["lm_head"]))  # both tables stay float
    bitcompile.save_packed(untied, tmp_path / "untied")
    tied = _llama(tie=True, seed=1)
    snapshot = _snapshot(tied)
    message = r"tensors 'embed_tokens.weight' and 'lm_head.weight' .* differ, but the model ties them"
    with pytest.raises(CheckpointError, match=message) as info:
        bitcompile.load_packed(tmp_path / "untied", tied)
    assert "\n" not in str(info.value)
    _assert_unchanged(tied, snapshot)
    # two stored copies of one value lose nothing: that loads
    untied.lm_head.weight.data.copy_(untied.embed_tokens.weight.data)
    bitcompile.save_packed(untied, tmp_path / "equal")
    loaded = bitcompile.load_packed(tmp_path / "equal", _llama(tie=True, seed=1))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, untied.lm_head.weight)


# --- item 8: .to(dtype) on a packed model, NaN in the int8 head, save never writes what load refuses --


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16)])
def test_dtype_conversion_keeps_codes_and_scales_and_round_trips(tmp_path, convert, dtype):
    packed = bitcompile.pack(_mlp(), TernaryConfig(group_size=16))
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedTernaryLinear)}
    weights = {n: (m.packed, m.scales, m.dequantized_weight()) for n, m in layers.items()}
    convert(packed)
    for name, layer in layers.items():
        packed_codes, scales, weight = weights[name]
        assert layer.scales.dtype == torch.float32 and layer.scales is scales, name  # never rounded
        assert layer.packed is packed_codes and torch.equal(layer.dequantized_weight(), weight), name
        assert layer.bias.dtype == dtype and layer.original_dtype == dtype, name
    x = torch.randn(3, 40, dtype=dtype)
    with torch.no_grad():
        y = packed(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    bitcompile.save_packed(packed, tmp_path)
    loaded = bitcompile.load_packed(tmp_path, lambda: convert(_mlp()))
    _assert_same_state(loaded, packed)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    packed.float()  # and back: the bias returns to fp32, scales untouched
    assert all(m.bias.dtype == torch.float32 and m.scales is weights[n][1] for n, m in layers.items())


def test_int8_head_keeps_its_table_under_to_dtype_and_round_trips(tmp_path):
    packed = bitcompile.pack(_llama(), head="int8")
    codes, scales = packed.lm_head.codes, packed.lm_head.scales
    packed.to(torch.bfloat16)
    assert packed.lm_head.codes is codes and packed.lm_head.scales is scales  # still shared with the embedding
    assert packed.embed_tokens.scales is scales and scales.dtype == torch.float32
    assert packed.embed_tokens.original_dtype == torch.bfloat16
    tokens = torch.randint(0, 40, (1, 7))
    assert packed.embed_tokens(tokens).dtype == torch.bfloat16
    bitcompile.save_packed(packed, tmp_path)
    loaded = bitcompile.load_packed(tmp_path, lambda: _llama(seed=1).to(torch.bfloat16))
    assert loaded.lm_head.codes is loaded.embed_tokens.codes
    _assert_same_state(loaded, packed)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), packed(tokens))


def test_save_packed_never_writes_what_load_packed_refuses(tmp_path):
    packed = bitcompile.pack(_mlp())
    path = bitcompile.save_packed(packed, tmp_path)
    good = path.read_bytes()
    broken = [
        ("out.scales", lambda m: m.out.scales.__setitem__((2, 0), float("nan")), "non-finite or non-positive scales"),
        ("out.scales", lambda m: setattr(m.out, "scales", m.out.scales.half()), r"'out.scales': model has torch.float16"),
        ("out.bias", lambda m: setattr(m.out, "bias", m.out.bias[:3]), r"'out.bias': model has torch.float32 \(3,\)"),
        ("hidden.0", lambda m: setattr(m.hidden[0], "original_dtype", torch.int32), "original_dtype='int32'"),
    ]
    for name, breaks, message in broken:
        model = copy.deepcopy(packed)
        breaks(model)
        with pytest.raises(CheckpointError, match=rf"save_packed: not writing a checkpoint load_packed would refuse: .*{message}"):
            bitcompile.save_packed(model, tmp_path)
        assert path.read_bytes() == good, name  # the checkpoint already there is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_int8_head_refuses_a_nan_weight_naming_the_layer():
    model = _llama()
    model.embed_tokens.weight.data[3, 5] = float("nan")  # tied: the head's weight too
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"pack\(head='int8'\): layer 'lm_head': weight has NaN or inf values"):
        bitcompile.pack(model, head="int8")
    _assert_unchanged(model, snapshot)


# --- item 9: torch.compile / DataParallel wrappers ---------------------------------------------


def test_wrapped_models_save_and_load_under_their_own_names(tmp_path):
    packed = bitcompile.pack(_mlp())
    compiled = torch.compile(packed, backend="bitcpm", options={"inner": "aot_eager"})
    for wrapper, directory in ((compiled, "compiled"), (nn.DataParallel(packed), "data_parallel")):
        path = bitcompile.save_packed(wrapper, tmp_path / directory)
        metadata, tensors = _read(path)
        assert sorted(json.loads(metadata["layers"])) == ["hidden.0", "out"]
        assert not any(name.startswith(("_orig_mod.", "module.")) for name in tensors), directory
        _assert_same_state(bitcompile.load_packed(path, _mlp), packed)
    # loading into a compiled model fills the model inside and returns the wrapper
    target = torch.compile(_mlp(), backend="bitcpm", options={"inner": "aot_eager"})
    assert bitcompile.load_packed(tmp_path / "compiled", target) is target
    _assert_same_state(target._orig_mod, packed)
    x = torch.randn(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(target(x), packed(x), rtol=0, atol=1e-6)
    # checkpoints an older save_packed wrote with the wrapper's prefix still load
    metadata, tensors = _read(tmp_path / "compiled" / "model.safetensors")
    layers = {f"_orig_mod.{k}": v for k, v in json.loads(metadata["layers"]).items()}
    _write(tmp_path / "legacy" / "model.safetensors", {**metadata, "layers": json.dumps(layers)},
           {f"_orig_mod.{k}": v for k, v in tensors.items()})  # fmt: skip
    _assert_same_state(bitcompile.load_packed(tmp_path / "legacy", _mlp), packed)


def test_a_ddp_wrapped_packed_model_with_a_trainable_layer_saves_under_its_own_names(tmp_path):
    import torch.distributed as dist

    packed = bitcompile.pack(_mlp(), TernaryConfig(exclude=["out"]))  # a float layer to train beside the packed one
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        path = bitcompile.save_packed(nn.parallel.DistributedDataParallel(packed), tmp_path)
    finally:
        dist.destroy_process_group()
    assert sorted(_read(path)[1]) == ["hidden.0.bias", "hidden.0.packed", "hidden.0.scales", "out.bias", "out.weight"]
    _assert_same_state(bitcompile.load_packed(path, _mlp), packed)


# --- items 10-12: malformed metadata, oversized shapes and groups ------------------------------


def _layers_edit(edit):
    def apply(metadata):
        layers = json.loads(metadata["layers"])
        edit(layers)
        metadata["layers"] = json.dumps(layers)

    return apply


MALFORMED = [
    ("layers []", lambda m: m.update(layers="[]"), "'layers' is an array, expected an object"),
    ("layers null", lambda m: m.update(layers="null"), "'layers' is null"),
    ("layers string", lambda m: m.update(layers='"hidden.0"'), "'layers' is a string"),
    ("layers empty", lambda m: m.update(layers="{}"), "'layers' lists no packed layer"),
    ("layers missing", lambda m: m.pop("layers"), "'layers' is missing"),
    ("deeply nested", lambda m: m.update(layers="[" * 100_000 + "]" * 100_000), "'layers' is not valid JSON"),
    ("nested in a layer", _layers_edit(lambda ls: ls["out"].update(in_features=json.loads("[" * 900 + "]" * 900))),
     r"layer 'out': metadata in_features=\[\[\[\.\.\.\]\]\] is invalid"),
    ("no in_features", _layers_edit(lambda ls: ls["out"].pop("in_features")), "layer 'out': metadata lacks 'in_features'"),
    ("no bias", _layers_edit(lambda ls: ls["out"].pop("bias")), "layer 'out': metadata lacks 'bias'"),
    ("no group_size", _layers_edit(lambda ls: ls["out"].pop("group_size")), "layer 'out': metadata lacks 'group_size'"),
    ("float in_features", _layers_edit(lambda ls: ls["out"].update(in_features=24.0)), "in_features=24.0 is invalid"),
    ("bool bias", _layers_edit(lambda ls: ls["out"].update(bias=1)), "bias=1 is invalid: expected true or false"),
    ("float group", _layers_edit(lambda ls: ls["out"].update(group_size=-1.0)), "group_size=-1.0 is invalid"),
    ("huge group", _layers_edit(lambda ls: ls["out"].update(group_size=2**31)), "group_size=2147483648 is invalid"),
    ("layer a list", _layers_edit(lambda ls: ls.update(out=[])), "layer 'out': metadata is an array"),
    ("unknown key", _layers_edit(lambda ls: ls["out"].update(scale=2)), "layer 'out': metadata has unknown key"),
    ("int dtype", _layers_edit(lambda ls: ls["out"].update(original_dtype="int8")), "original_dtype='int8' is invalid"),
    ("dunder name", _layers_edit(lambda ls: ls.update(__class__=ls.pop("out"))), "layer '__class__' does not exist"),
    ("traversal", _layers_edit(lambda ls: ls.update({"../out": ls.pop("out")})), "'../out' is not a dotted module path"),
    ("nested layers", _layers_edit(lambda ls: ls.update({"hidden": ls["out"]})), "'hidden.0' lies inside layer 'hidden'"),
    ("int8_layers list", lambda m: m.update(int8_layers="[]"), "'int8_layers' is an array"),
    ("int8 kind list", lambda m: m.update(int8_layers='{"x": {"kind": []}}'), "int8 layer 'x' has unknown kind"),
    ("version", lambda m: m.update(format_version="4"), "format_version='4'"),
]


@pytest.mark.parametrize("edit, message", [pytest.param(e, msg, id=i) for i, e, msg in MALFORMED])
def test_malformed_metadata_is_one_checkpoint_error(tmp_path, edit, message):
    path = bitcompile.save_packed(bitcompile.pack(_mlp()), tmp_path)
    metadata, tensors = _read(path)
    edit(metadata)
    _write(path, metadata, tensors)
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(CheckpointError, match=message) as info:
        bitcompile.load_packed(tmp_path, model)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    _assert_unchanged(model, snapshot)


def test_declared_int8_shapes_are_checked_before_anything_is_allocated(tmp_path):
    path = bitcompile.save_packed(bitcompile.pack(_llama(), head="int8"), tmp_path)
    metadata, tensors = _read(path)
    int8_layers = json.loads(metadata["int8_layers"])
    int8_layers["embed_tokens"].update(num_embeddings=10**7, embedding_dim=10**5)  # 1 TB of int8 codes
    int8_layers["lm_head"].update(out_features=10**7, in_features=10**5)
    _write(path, {**metadata, "int8_layers": json.dumps(int8_layers)}, tensors)
    model = _llama()
    snapshot = _snapshot(model)
    message = r"layer 'embed_tokens': checkpoint has an int8 Embedding of weight shape \(10000000, 100000\), the model has"
    with pytest.raises(CheckpointError, match=message + r" Embedding \(40, 48\)"):
        bitcompile.load_packed(tmp_path, model)
    _assert_unchanged(model, snapshot)


def test_a_group_longer_than_k_is_one_group_without_allocating_n_by_g(tmp_path):
    model = nn.Sequential(nn.Linear(64, 256))
    x = torch.randn(3, 64)
    per_row = bitcompile.pack(copy.deepcopy(model))
    # groups of 10**9: a K=64 layer has one group of 64 (the last group is cut at K), so it is
    # per-row; repeating each scale g times first used to ask for 256 * 10**9 floats (1 TB)
    long_groups = bitcompile.pack(copy.deepcopy(model), TernaryConfig(group_size=10**9))
    assert long_groups[0].group_size == ScaleGroups.of(10**9) and long_groups[0].scales.shape == (256, 1)
    assert torch.equal(long_groups[0].packed, per_row[0].packed) and torch.equal(long_groups[0].scales, per_row[0].scales)
    assert torch.equal(long_groups[0].dequantized_weight(), per_row[0].dequantized_weight())
    with torch.no_grad():
        torch.testing.assert_close(long_groups(x), per_row(x), rtol=1e-6, atol=1e-6)
    path = bitcompile.save_packed(long_groups, tmp_path)
    assert json.loads(_read(path)[0]["layers"])["0"]["group_size"] == 10**9
    _assert_same_state(bitcompile.load_packed(tmp_path, lambda: nn.Sequential(nn.Linear(64, 256))), long_groups)
    # a group length the kernels' C int cannot hold is refused, not wrapped around (to 32 here)
    layer = long_groups[0]
    for kernel in ("cpu", "reference"):
        with pytest.raises(ValueError, match="group_size code 4294967328 is invalid"):
            torch.ops.bitcpm.ternary_linear_packed(x, layer.packed, layer.scales, layer.bias, 64, 2**32 + 32, True, kernel)
    options = {"inner": "aot_eager", "target": "reference"}
    with torch.no_grad():
        expected = torch.compile(copy.deepcopy(model), backend="bitcpm", options=options)(x)
        got = torch.compile(copy.deepcopy(model), backend="bitcpm", options={**options, "group_size": 10**9})(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# --- float layers pack() served with the fp32 GEMV come back served the same way ---------------


@pytest.mark.skipif(not bitcompile.kernels.cpu.available(), reason="the C kernels are not built")
def test_float_layers_served_by_the_fp32_gemv_load_served_the_same_way(tmp_path):
    from bitcompile.runtime.modules import FloatGemvLinear

    packed = bitcompile.pack(_llama(tie=False))  # the head stays fp32: pack serves it with the GEMV
    assert type(packed.lm_head) is FloatGemvLinear
    bitcompile.save_packed(packed, tmp_path / "ckpt")
    metadata, _ = _read(tmp_path / "ckpt" / "model.safetensors")
    assert json.loads(metadata["float_gemv_layers"]) == ["lm_head"]
    loaded = bitcompile.load_packed(tmp_path / "ckpt", _llama(tie=False, seed=1))
    assert type(loaded.lm_head) is FloatGemvLinear
    ids = torch.randint(0, 40, (1, 1))
    with torch.no_grad():  # one token: the GEMV on both sides, so the same sums bit for bit
        assert torch.equal(loaded(ids), packed(ids))


def test_float_gemv_layers_in_the_metadata_are_checked_before_the_model_changes(tmp_path):
    packed = bitcompile.pack(_llama(tie=False))
    bitcompile.save_packed(packed, tmp_path / "ok")
    metadata, tensors = _read(tmp_path / "ok" / "model.safetensors")
    cases = {
        '{"lm_head": 1}': r"'float_gemv_layers' must be an array of layer names",
        "[not json": r"'float_gemv_layers' is not valid JSON",
        '["lm_head", "lm_head"]': r"lists a layer twice",
        '["lm_head..x"]': r"is not a dotted module path",
        '["nowhere"]': r"float layer 'nowhere' \(fp32 GEMV when saved\) does not exist in the model",
        '["norm"]': r"float layer 'norm' \(fp32 GEMV when saved\) is a RMSNorm in the model, expected nn.Linear",
    }
    layer = next(name for name, m in packed.named_modules() if isinstance(m, PackedTernaryLinear))
    cases[json.dumps([layer])] = rf"float layer '{layer}' is listed as a packed or int8 layer too"
    for value, message in cases.items():
        _write(tmp_path / "bad" / "model.safetensors", {**metadata, "float_gemv_layers": value}, tensors)
        model = _llama(tie=False, seed=1)
        snapshot = _snapshot(model)
        with pytest.raises(CheckpointError, match=message) as info:
            bitcompile.load_packed(tmp_path / "bad", model)
        assert "\n" not in str(info.value)
        _assert_unchanged(model, snapshot)


def test_a_float_gemv_layer_this_process_cannot_serve_is_said_once(tmp_path, monkeypatch):
    from bitcompile.kernels import cpu as cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the C kernels are not built")
    packed = bitcompile.pack(_llama(tie=False))
    bitcompile.save_packed(packed, tmp_path / "ckpt")
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    with pytest.warns(bitcompile.BitcompileWarning, match=r"1 float layers \(first: 'lm_head': bitcompile's C kernels are not built\)"):
        loaded = bitcompile.load_packed(tmp_path / "ckpt", _llama(tie=False, seed=1))
    assert type(loaded.lm_head) is nn.Linear
