"""compile_decoder() and the C++ serving operators (torch.ops.bitcpm_native.*).

The C++ operators must compute exactly what the Python ops' C path computes (the same C
kernels, so bit-identical), reject bad input with an error naming the op, and the compiled
decode must give the eager packed model's greedy tokens with no bitcompile Python code
running per token. Compiled tests use inner="aot_eager" (the same graph and operators,
without inductor's C++ compile time); the benchmark runs inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

import bitcompile
from bitcompile.kernels import native
from bitcompile.kernels.cpu import library
from bitcompile.kernels.packing import pack_codes
from bitcompile.ops.dense import int8_linear
from bitcompile.runtime import compiled_decode
from bitcompile.runtime.compiled_decode import compile_decoder
from tests.python_frames import bitcompile_frames

pytestmark = pytest.mark.skipif(not library.available(), reason="the C kernels are not built")


@pytest.fixture(scope="module")
def ops():
    if not native.load():
        pytest.skip(f"C++ operators unavailable: {native.unavailable_reason()}")
    return torch.ops.bitcpm_native


def _reference(x, codes, scales, group, bias):
    """W1.58A8 from the formulas: per-token absmax int8 activations, int codes, group scales."""
    xf = x.float()
    sx = xf.abs().amax(-1, keepdim=True).clamp_min(1e-5) / 127
    xq = (xf / sx).round().clamp(-128, 127)
    k = codes.shape[1]
    g = k if group <= 0 else group
    y = 0
    for i, k0 in enumerate(range(0, k, g)):
        part = xq[..., k0 : k0 + g] @ codes[:, k0 : k0 + g].float().T
        y = y + part * scales[:, i if group > 0 else 0]
    y = y * sx
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [-1, 0, 64])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
# m = 24 and 70 (48 and 140 tokens) take the op's int8-tile path (at::_int_mm) for per-row and
# per-tensor scales; n = 1100 spans two decoded tiles
@pytest.mark.parametrize("m,n,k", [(1, 48, 576), (5, 40, 200), (24, 1100, 576), (70, 40, 200)])
def test_native_ternary_op_matches_the_python_op_bit_for_bit(ops, dtype, group, bias_dtype, m, n, k):
    torch.manual_seed(m * 7 + k)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    n_groups = -(-k // group) if group > 0 else 1
    scales = torch.rand(n, n_groups) + 0.5
    if group == 0:
        scales = scales[:1].expand(n, 1).contiguous()
    bias = None if bias_dtype is None else torch.randn(n, dtype=bias_dtype)
    x = torch.randn(2, m, k).to(dtype)
    packed = pack_codes(codes)
    python = torch.ops.bitcpm.ternary_linear_packed(x, packed, scales, bias, k, group, True, "cpu")
    cpp = ops.ternary_linear_packed(x, packed, scales, bias, k, group, library.isa_id())
    assert cpp.dtype == python.dtype == dtype and cpp.shape == (2, m, n)
    assert torch.equal(cpp, python)
    torch.testing.assert_close(cpp.float(), _reference(x, codes, scales, group, bias), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_native_dense_ops_match_their_python_twins(ops):
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (300, 64), dtype=torch.int8)
    scales, bias = torch.rand(300, 1) / 100, torch.randn(300)
    x = torch.randn(3, 64)
    assert torch.equal(ops.int8_dense_linear(x, codes, scales, bias, library.isa_id()), int8_linear(x, codes, scales, bias))
    weight = torch.randn(300, 64)
    for rows in (1, 9):  # the GEMV, then torch's linear above DENSE_MAX_M tokens
        xs = torch.randn(rows, 64)
        torch.testing.assert_close(ops.float_gemv_linear(xs, weight, bias, library.isa_id()), F.linear(xs, weight, bias))


def test_native_ops_reject_bad_input_naming_the_op(ops):
    packed = pack_codes(torch.zeros(8, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"bitcpm_native::ternary_linear_packed: activations have 32 features, the layer takes 64"):
        ops.ternary_linear_packed(torch.randn(1, 32), packed, torch.ones(8, 1), None, 64, -1, library.isa_id())
    with pytest.raises(RuntimeError, match=r"ternary_linear_packed: scales must be contiguous fp32 \(8, 1\)"):
        ops.ternary_linear_packed(torch.randn(1, 64), packed, torch.ones(8, 2), None, 64, -1, library.isa_id())
    with pytest.raises(RuntimeError, match=r"ternary_linear_packed: activations must be CPU float32/bfloat16"):
        ops.ternary_linear_packed(torch.ones(1, 64, dtype=torch.int32), packed, torch.ones(8, 1), None, 64, -1, library.isa_id())
    with pytest.raises(RuntimeError, match=r"int8_dense_linear: activations must be CPU float32/bfloat16 \(\.\.\., 64\)"):
        ops.int8_dense_linear(torch.randn(2, 63), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 1), None, library.isa_id())


def _tiny_llama(head):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return bitcompile.pack(model, head=head) if head else bitcompile.pack(model)


@pytest.mark.parametrize("head", ["int8", None])
def test_compiled_decode_gives_the_eager_tokens_with_no_python_per_layer(ops, head):
    model = _tiny_llama(head)
    prompt = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=12, do_sample=False)
    decoder = compile_decoder(model, max_cache_len=32, inner="aot_eager")
    assert torch.equal(decoder.greedy(prompt, 12), eager)
    # every serving op of every graph (prefill, decode) became a C++ operator
    assert decoder.graphs and all(g.get("ternary_linear_packed") == 14 and not any(k.startswith("kept:") for k in g) for g in decoder.graphs)
    head_op = "int8_dense_linear" if head == "int8" else "float_gemv_linear"
    assert all(g.get(head_op) == 1 for g in decoder.graphs)

    cache = decoder.static_cache()
    token = eager[:, 7:8]
    with torch.no_grad():
        logits = decoder.decode_step(token, 7, cache)  # warm: the decode graph exists already
        frames = bitcompile_frames(lambda: decoder.decode_step(eager[:, 8:9], 8, cache))
    assert logits.shape == (1, 1, 300)
    # only the loop's own entry and the compiled forward's dispatch: no layer, op or kernel code
    entry = {
        "compiled_decode.py:decode_step", "compiled_decode.py:forward", "compiled_decode.py:_compiled",
        "compiled_decode.py:decode_forward",
    }  # fmt: skip
    assert frames and set(frames) <= entry, frames

    with torch.no_grad():  # transformers' generate() runs the installed compiled forward
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, eager)
    decoder.uninstall()
    assert "forward" not in model.__dict__


def test_compile_decoder_rejects_bad_arguments_and_leaves_the_model_alone():
    model = _tiny_llama("int8")
    with pytest.raises(ValueError, match="inner must be one of"):
        compile_decoder(model, inner="eager-ish")
    with pytest.raises(ValueError, match="max_cache_len must be >= 1"):
        compile_decoder(model, max_cache_len=0)
    with pytest.raises(TypeError, match="expected a Hugging Face causal LM"):
        compile_decoder(torch.nn.Linear(2, 2))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        compile_decoder(model)
    assert "forward" not in model.__dict__
    model.eval()
    decoder = compile_decoder(model, max_cache_len=8, inner="aot_eager")
    with pytest.raises(ValueError, match=r"exceeds the static cache \(max_cache_len=8\)"):
        decoder.greedy(torch.zeros(1, 5, dtype=torch.long), 4)
    decoder.uninstall()


def test_without_the_cpp_operators_one_warning_and_the_python_ops(monkeypatch):
    monkeypatch.setattr(native, "_state", {"ok": False, "reason": "the C++ torch operators could not be built (test)"})
    monkeypatch.setattr(compiled_decode, "_warned_python_ops", False)
    model = _tiny_llama("int8")
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with pytest.warns(bitcompile.BitcompileWarning, match=r"could not be built \(test\).*Python serving ops"):
        decoder = compile_decoder(model, max_cache_len=16, inner="aot_eager")
    assert not decoder.native and decoder.graphs == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", bitcompile.BitcompileWarning)  # said once
        second = compile_decoder(_tiny_llama("int8"), max_cache_len=16, inner="aot_eager")
    assert torch.equal(decoder.greedy(prompt, 4), eager)
    decoder.uninstall()
    second.uninstall()


def test_decode_graphs_are_told_apart_by_their_token_ids():
    codes = torch.zeros(300, 64, dtype=torch.int8)  # 2-D integer weights are not token ids
    assert compiled_decode.is_decode_graph([torch.zeros(1, 1, dtype=torch.long), torch.arange(1), codes, torch.randn(4, 4)])
    assert compiled_decode.is_decode_graph([torch.zeros(3, 1, dtype=torch.long)])
    assert not compiled_decode.is_decode_graph([torch.zeros(1, 128, dtype=torch.long), torch.arange(128), codes])
    assert not compiled_decode.is_decode_graph([codes, torch.randn(1, 1)])  # no token ids at all


def test_compile_decoder_refuses_one_point_six_bit_layers_naming_one():
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = bitcompile.pack(transformers.LlamaForCausalLM(config).eval(), layout="1.6bit")
    with pytest.raises(ValueError, match=r"compile_decoder: 7 layers \(first: model\.layers\.0\.self_attn\.q_proj\) are in the 1\.6-bit layout"):
        compile_decoder(model, inner="aot_eager")
    assert "forward" not in model.__dict__ and model.config._attn_implementation == "sdpa"


def test_the_installed_forward_keeps_the_signature_generate_reads():
    import inspect

    model = _tiny_llama("int8")
    expected = inspect.signature(model.forward)
    decoder = compile_decoder(model, max_cache_len=16, inner="aot_eager")
    # generate() passes logits_to_keep (a one-row head in the prefill) only to a forward that takes it
    assert inspect.signature(model.forward) == expected and "logits_to_keep" in expected.parameters
    decoder.uninstall()
