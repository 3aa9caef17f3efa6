"""pack / save / load / freeze: packed models compute what the independent reference says, lose nothing."""

import copy
import io
import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompile
import reference_impl as ref
from bitcompile import CheckpointError, PackedTernaryLinear
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig
from bitcompile.passes.freeze_pack import FrozenWeightsChanged
from bitcompile.runtime.modules import weight_nbytes

TOL = dict(rtol=1e-5, atol=1e-5)


def reference_mlp(model, x, group_size, activations):
    for layer in model.hidden:
        x = F.gelu(ref.fake_quant_linear(x, layer.weight, layer.bias, group_size, activations))
    return ref.fake_quant_linear(x, model.out.weight, model.out.bias, group_size, activations)


@pytest.mark.parametrize("group_size, activations", [(-1, "int8"), ("tensor", None), (32, "int8"), (64, None)])
def test_packed_mlp_matches_reference_and_frees_float_weights(group_size, activations):
    model = MLP(100, [72, 40], 10)  # K = 100, 72, 40: not multiples of 32/64, groups end short
    x = torch.randn(5, 100)
    expected = reference_mlp(model, x, group_size, activations)
    before = weight_nbytes(model)
    packed = bitcompile.pack(model, bitcompile.TernaryConfig(group_size=group_size, activations=activations))
    assert packed is model and all(isinstance(m, PackedTernaryLinear) for m in (*model.hidden, model.out))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())  # no float weight left
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    # 2-bit codes (rows padded to 64 codes = 16 bytes) + fp32 scales + the bias, nothing else.
    n_groups = lambda k: 1 if group_size in (-1, "tensor") else -(-k // group_size)  # noqa: E731
    shapes = [(72, 100), (40, 72), (10, 40)]
    expected_bytes = sum(n * -(-k // 64) * 16 + 4 * n * n_groups(k) + 4 * n for n, k in shapes)
    assert weight_nbytes(model) == expected_bytes < before / 4


def test_packed_model_equals_compiled_ternary_model_and_compiles():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=100)).eval()
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        unpacked = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})(tokens)
    packed = bitcompile.pack(copy.deepcopy(model))
    plan = {d.name: d for d in packed.bitcompile_pack_plan}
    assert not plan["lm_head"].packed and "embed_tokens.weight" in plan["lm_head"].reason
    with torch.no_grad():
        eager = packed(tokens)
        from torch._inductor.utils import run_and_get_code

        compiled, codes = run_and_get_code(torch.compile(packed, backend="bitcpm"), tokens)
    torch.testing.assert_close(eager, unpacked, **TOL)
    torch.testing.assert_close(compiled, eager, **TOL)
    calls = sum(code.count("torch.ops.bitcpm.ternary_linear_packed.default(") for code in codes)
    assert calls == 7 * model.config.num_layers  # one extern call per packed layer, the rest is inductor code


def test_pack_twice_and_failure_leaves_model_untouched():
    model = MLP(16, [16, 16], 4)
    with torch.no_grad():
        model.hidden[1].weight[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'hidden.1': weight has NaN"):
        bitcompile.pack(model)
    assert isinstance(model.hidden[0], nn.Linear)  # layer 0 was processed before the error, but not swapped
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True)
    ok = bitcompile.pack(MLP(16, [16], 4))
    with pytest.raises(ValueError, match="already packed: hidden.0"):
        bitcompile.pack(ok)


def ternary_weight(out_features, in_features, group_size, dtype=torch.bfloat16):
    """A pseudo-quantized weight: every group is {-s, 0, s} with its own s."""
    codes = torch.randint(-1, 2, (out_features, in_features))
    bounds = ref.group_bounds(in_features, group_size)
    w = torch.empty(out_features, in_features)
    for a, b in bounds:
        s = torch.rand(out_features if group_size != "tensor" else 1, 1) * 0.05 + 0.01
        w[:, a:b] = codes[:, a:b] * s
    return w.to(dtype), codes


def test_pack_of_a_path_that_is_no_folder_says_what_it_takes(tmp_path):
    """pack(path) loads Hugging Face folders only (runtime/hf_folder.py), never a CLI 'module:function' spec."""
    from bitcompile.runtime.hf_folder import ModelLoadError

    (tmp_path / "model.py").write_text("")
    for path, what in ((tmp_path / "missing", "not an existing folder"), (tmp_path / "model.py", "a file")):
        with pytest.raises(ModelLoadError, match=f"pack: '{path}' is {what}; pass an nn.Module, a local Hugging Face"):
            bitcompile.pack(path)
    with pytest.raises(ModelLoadError, match="is not an existing folder"):
        bitcompile.pack(f"{tmp_path / 'model.py'}:build")


@pytest.mark.parametrize("group_size", [-1, "tensor", 32])
def test_already_ternary_weights_pack_losslessly(group_size):
    model = nn.Sequential(nn.Linear(80, 24, dtype=torch.bfloat16))
    w, codes = ternary_weight(24, 80, group_size)
    with torch.no_grad():
        model[0].weight.copy_(w)
    config = bitcompile.TernaryConfig(group_size=group_size)
    bitcompile.pack(model, config, pre_quantized=True)
    assert model.bitcompile_pack_plan[0].source == "already ternary"
    assert torch.equal(model[0].codes().long(), codes)
    restored = model[0].dequantized_weight()
    torch.testing.assert_close(restored, w.float(), rtol=2**-7, atol=0)  # within one bf16 ulp

    latent = nn.Sequential(nn.Linear(80, 24))
    with pytest.raises(ValueError, match="layer '0': pre_quantized=True but its weight is not ternary"):
        bitcompile.pack(latent, config, pre_quantized=True)
    bitcompile.pack(latent, config)  # "auto": latent weights are quantized
    assert latent.bitcompile_pack_plan[0].source == "quantized"


def test_hf_folder_pack_in_one_call_both_checkpoint_forms(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    latent = transformers.LlamaForCausalLM(config).eval()
    pseudo = copy.deepcopy(latent)
    with torch.no_grad():
        for module in pseudo.modules():
            if isinstance(module, nn.Linear) and module is not pseudo.lm_head:
                module.weight.copy_(ref.fake_quant_weight(module.weight, -1))
    latent.save_pretrained(tmp_path / "latent")
    pseudo.save_pretrained(tmp_path / "pseudo")
    tokens = torch.randint(0, 50, (1, 10))

    packed_latent = bitcompile.pack(tmp_path / "latent")
    packed_pseudo = bitcompile.pack(tmp_path / "pseudo", pre_quantized=True)
    sources = {d.source for d in packed_pseudo.bitcompile_pack_plan if d.packed}
    assert sources == {"already ternary"}
    assert {d.source for d in packed_latent.bitcompile_pack_plan if d.packed} == {"quantized"}
    with torch.no_grad():
        # The pseudo-quantized model's own float forward (weights as stored) vs its packed form,
        # and the latent model's ternary forward (quantizer applied) vs its packed form.
        float_pseudo = pseudo(tokens).logits
        swapped = ref.swap_linears_for_fake_quant(copy.deepcopy(latent), group_size=-1)
        torch.testing.assert_close(packed_latent(tokens).logits, swapped(tokens).logits, rtol=1e-4, atol=1e-4)
        assert (packed_pseudo(tokens).logits - float_pseudo).abs().max() < 0.05  # only int8 activations differ


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    factory = lambda: TinyLlama(TinyLlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=100))  # noqa: E731
    packed = bitcompile.pack(factory().eval(), bitcompile.TernaryConfig(group_size=32))
    path = bitcompile.save_packed(packed, tmp_path)
    loaded = bitcompile.load_packed(tmp_path, factory).eval()
    for (name, a), (name_b, b) in zip(packed.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    tokens = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        assert torch.equal(packed(tokens), loaded(tokens))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tie survives the round trip
    assert path.stat().st_size < 0.5 * weight_nbytes(factory())


def _rewrite_checkpoint(path, edit_metadata=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if edit_metadata:
        edit_metadata(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_load_errors_name_the_problem(tmp_path):
    factory = lambda: MLP(40, [24], 6)  # noqa: E731
    path = bitcompile.save_packed(bitcompile.pack(factory()), tmp_path)

    with pytest.raises(CheckpointError, match=r"layer 'hidden.0': checkpoint has \(out, in\) = \(24, 40\)"):
        bitcompile.load_packed(tmp_path, lambda: MLP(40, [32], 6))

    original = path.read_bytes()
    _rewrite_checkpoint(path, edit_metadata=lambda m: m.update(format_version="99"))
    with pytest.raises(CheckpointError, match="format_version='99'"):
        bitcompile.load_packed(tmp_path, factory)

    path.write_bytes(original)
    _rewrite_checkpoint(path, edit_tensors=lambda t: t["out.packed"].__setitem__((2, 0), 0b11))
    user_model = factory()
    with pytest.raises(CheckpointError, match="tensor 'out.packed' holds the 2-bit code 3 .row 2."):
        bitcompile.load_packed(tmp_path, user_model)
    assert isinstance(user_model.out, nn.Linear)  # validation happens before the model is touched

    path.write_bytes(original)
    _rewrite_checkpoint(path, edit_tensors=lambda t: t.__setitem__("out.scales", t["out.scales"][:3]))
    with pytest.raises(CheckpointError, match="tensor 'out.scales': checkpoint has torch.float32 \\(3, 1\\)"):
        bitcompile.load_packed(tmp_path, factory)

    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        bitcompile.load_packed(tmp_path, factory)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no packed checkpoint"):
        bitcompile.load_packed(tmp_path, factory)
    header = json.loads(original[8 : 8 + struct.unpack("<Q", original[:8])[0]])
    assert header["__metadata__"]["layout"] == "bc_i2_planar256_t64"


def test_freeze_folds_weights_and_refuses_stale_ones():
    model = MLP(40, [24], 6).eval()
    x = torch.randn(3, 40)
    compiled = torch.compile(model, backend="bitcpm", options={"freeze": True, "inner": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference_mlp(model, x, -1, "int8"), **TOL)
        model.out.weight.add_(0.1)
        with pytest.raises(FrozenWeightsChanged, match="layer 'out' changed after it was frozen"):
            compiled(x)
    with pytest.raises(Exception, match="inference-only"):
        torch.compile(MLP(8, [8], 2), backend="bitcpm", options={"freeze": True})(torch.randn(2, 8))


def _new_weight(model):
    return torch.randn(model.out.weight.shape, generator=torch.Generator().manual_seed(7))


# writes that leave the version counter as it was (issue 15, item 5)
UNTRACKED_WRITES = {
    "data.copy_": lambda model: model.out.weight.data.copy_(_new_weight(model)),  # .data: a counter of its own
    "data =": lambda model: setattr(model.out.weight, "data", _new_weight(model)),
    "data[0, 0] +=": lambda model: model.out.weight.data[0].add_(1.0),  # one row, through .data
}


@pytest.mark.parametrize("write", list(UNTRACKED_WRITES.values()), ids=list(UNTRACKED_WRITES))
def test_freeze_refuses_weights_written_behind_the_version_counter(write):
    model = MLP(40, [24], 6).eval()
    x = torch.randn(3, 40)
    compiled = torch.compile(model, backend="bitcpm", options={"freeze": True, "inner": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference_mlp(model, x, -1, "int8"), **TOL)
        version = model.out.weight._version
        write(model)
        assert model.out.weight._version == version  # invisible to the counter
        with pytest.raises(FrozenWeightsChanged, match="layer 'out' changed after it was frozen"):
            compiled(x)


def test_freeze_under_inference_mode_refuses_a_loaded_state_dict():
    """Inference tensors have no version counter: load_state_dict used to leave the old weights
    folded in, served with the new bias."""
    with torch.inference_mode():
        model = MLP(40, [24], 6).eval()
        x = torch.randn(3, 40)
        compiled = torch.compile(model, backend="bitcpm", options={"freeze": True, "inner": "aot_eager"})
        torch.testing.assert_close(compiled(x), reference_mlp(model, x, -1, "int8"), **TOL)
        torch.manual_seed(1)
        model.load_state_dict(MLP(40, [24], 6).state_dict())
        with pytest.raises(FrozenWeightsChanged, match="changed after it was frozen"):
            compiled(x)


def test_freeze_keeps_serving_after_reads_and_equal_rewrites():
    """Reading the weights (an eager forward, torch.save) or putting the same values back is no change."""
    model = MLP(40, [24], 6).eval()
    x = torch.randn(3, 40)
    compiled = torch.compile(model, backend="bitcpm", options={"freeze": True, "inner": "aot_eager"})
    with torch.no_grad():
        want = compiled(x)
        model(x)
        torch.save(model.state_dict(), io.BytesIO())
        model.out.weight.data = model.out.weight.detach().clone()
        assert torch.equal(compiled(x), want)
        assert torch.equal(compiled(x), want)
        model.out.weight.data.mul_(2)  # and a later untracked write is still seen
        with pytest.raises(FrozenWeightsChanged):
            compiled(x)


@pytest.mark.parametrize("group_size", [-1, 0, 32])
@pytest.mark.parametrize("quantize_activations", [True, False])
def test_opcheck_packed_op(group_size, quantize_activations):
    from bitcompile.kernels.packing import pack_codes

    codes = torch.randint(-1, 2, (24, 100), dtype=torch.int8)
    scales = torch.rand(24, 4 if group_size == 32 else 1) + 0.01
    args = (torch.randn(2, 3, 100), pack_codes(codes), scales, torch.randn(24), 100, group_size, quantize_activations, "reference")
    torch.library.opcheck(torch.ops.bitcpm.ternary_linear_packed.default, args)


def test_gpt2_conv1d_layers_pack_like_the_compiler_rewrites_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        unpacked = torch.compile(model, backend="bitcpm", options={"inner": "eager"})(tokens).logits
    report_names = {d.name for d in bitcompile.explain(model, tokens).rewritten}
    packed = bitcompile.pack(copy.deepcopy(model))
    packed_names = {d.name for d in packed.bitcompile_pack_plan if d.packed}
    assert packed_names == report_names and "transformer.h.1.mlp.c_proj" in packed_names
    assert isinstance(packed.transformer.h[0].attn.c_attn, PackedTernaryLinear)
    with torch.no_grad():
        torch.testing.assert_close(packed(tokens).logits, unpacked, **TOL)
    bitcompile.save_packed(packed, tmp_path)
    loaded = bitcompile.load_packed(tmp_path, lambda: transformers.GPT2LMHeadModel(config)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, packed(tokens).logits)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc; malloc_trim is glibc's")
def test_pack_hands_the_freed_float_weights_back_to_the_os():
    code = textwrap.dedent(
        """
        import torch, bitcompile
        def rss_mib():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        junk = torch.empty(30 << 20, dtype=torch.uint8)
        junk.fill_(1)
        del junk  # raises glibc's mmap threshold, as a real process has: the weights below live in the heap
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)])  # 96 MiB of fp32
        before = rss_mib()
        bitcompile.pack(model)
        print("dropped", before - rss_mib())
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dropped = float(result.stdout.split("dropped")[-1])
    assert dropped > 48, f"RSS dropped only {dropped:.0f} MiB after packing 96 MiB of fp32 weights"


class Half(nn.Linear):
    """An nn.Linear subclass that adds to what nn.Linear computes."""

    def forward(self, x):
        return super().forward(x) * 0.5


class WeightNormalised(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


def compiled_qat_output(model, *inputs, **options):
    with torch.no_grad():
        return torch.compile(model, backend="bitcpm", options={"inner": "aot_eager", **options})(*inputs)


OVERRIDE_REASON = "overrides nn.Linear.forward; pack() cannot keep its forward around 2-bit weights"


@pytest.mark.parametrize(
    "subclass, compiler_reason",
    [(Half, "Half " + OVERRIDE_REASON), (WeightNormalised, "weight is an activation computed in the graph")],
)
def test_linear_subclass_with_own_forward_is_kept_float_by_compiler_and_pack(subclass, compiler_reason):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), subclass(32, 16))
    x = torch.randn(4, 32)
    report = bitcompile.explain(model, x)
    assert {d.name for d in report.rewritten} == {"0"}
    assert len(report.skipped) == 1 and report.skipped[0].reason.startswith(compiler_reason)
    expected = compiled_qat_output(model, x)
    packed = bitcompile.pack(copy.deepcopy(model))
    assert isinstance(packed[0], PackedTernaryLinear) and type(packed[2]) is subclass
    assert f"{subclass.__name__} {OVERRIDE_REASON}" in packed.bitcompile_pack_plan[1].reason
    with torch.no_grad():
        torch.testing.assert_close(packed(x), expected, **TOL)
        first = ref.fake_quant_linear(x, model[0].weight, model[0].bias, -1, "int8")
        torch.testing.assert_close(packed(x), model[2](F.relu(first)), **TOL)  # subclass forward, float weight


def test_forward_hooks_survive_packing_and_their_handles_still_remove_them():
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(3, 32)
    calls = []
    pre = model[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    post = model[0].register_forward_hook(lambda module, args, out: calls.append(type(module).__name__) or out + 1)
    weight, bias = model[0].weight, model[0].bias
    expected = ref.fake_quant_linear(x * 2, weight, bias, -1, "int8") + 1
    packed = bitcompile.pack(model)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), expected, **TOL)
    assert calls == ["PackedTernaryLinear"]
    pre.remove(), post.remove()
    with torch.no_grad():
        plain = packed(x)
    assert calls == ["PackedTernaryLinear"]  # the removed hook did not run
    torch.testing.assert_close(plain, ref.fake_quant_linear(x, weight, bias, -1, "int8"), **TOL)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(F.relu(self.fc(F.relu(self.fc(x)))))


class WeightReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.fc(x) + self.fc.weight.mean(0))


@pytest.mark.parametrize("model_class", [CalledTwice, WeightReadElsewhere])
def test_pack_with_example_inputs_follows_the_compiler_on_shared_layers(model_class):
    model = model_class()
    x = torch.randn(4, 32)
    report = bitcompile.explain(model, x)
    assert {d.name for d in report.rewritten} == {"out"} and "weight is shared" in report.skipped[0].reason
    expected = compiled_qat_output(model, x)
    packed = bitcompile.pack(copy.deepcopy(model), example_inputs=(x,))
    plan = {d.name: d for d in packed.bitcompile_pack_plan}
    assert plan["out"].packed and not plan["fc"].packed
    assert plan["fc"].reason.startswith("the compiler keeps it float: weight is shared")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), expected, **TOL)


def test_pack_with_example_inputs_keeps_layers_the_forward_never_calls_float():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(32, 8), nn.Linear(32, 8)

        def forward(self, x):
            return self.used(x)

    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="example_inputs must be a tuple or list of model inputs, got Tensor"):
        bitcompile.pack(Unused(), example_inputs=x)
    plan = {d.name: d for d in bitcompile.pack(Unused(), example_inputs=(x,)).bitcompile_pack_plan}
    assert plan["used"].packed and not plan["spare"].packed
    assert plan["spare"].reason.startswith("not called when the model ran on example_inputs")


def test_state_dict_hooks_of_a_packed_layer_are_dropped_with_a_warning():
    model = nn.Sequential(nn.Linear(32, 16))
    model[0]._register_state_dict_hook(lambda module, state, prefix, local: state)
    with pytest.warns(bitcompile.BitcompileWarning, match=r"layer '0': its _state_dict_hooks hooks .* were dropped"):
        bitcompile.pack(model)
    assert isinstance(model[0], PackedTernaryLinear) and not model[0]._state_dict_hooks


def test_freeze_an_older_graph_refuses_weights_a_newer_graph_folded():
    """Graphs for two input shapes: the second is frozen after an untracked write, so it folds
    the new weights; the first must still refuse them (it folded the old ones)."""
    model = MLP(40, [24], 6).eval()
    small, large = torch.randn(3, 40), torch.randn(5, 40)
    compiled = torch.compile(model, backend="bitcpm", options={"freeze": True, "inner": "aot_eager"}, dynamic=False)
    with torch.no_grad():
        compiled(small)
        model.out.weight.data.copy_(_new_weight(model))
        torch.testing.assert_close(compiled(large), reference_mlp(model, large, -1, "int8"), **TOL)
        with pytest.raises(FrozenWeightsChanged, match="layer 'out' changed"):
            compiled(small)
