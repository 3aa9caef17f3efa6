"""bitcpm_native::decode_attention and the transformers attention function that calls it.

The op must compute softmax(scale * q K^T + mask) V for one query token per sequence, each
query head reading its grouped KV head in place, as the formula says (reference below, written
from the formula, not from SDPA); reject what it does not cover with an error naming the op;
and compile_decoder must switch a model to it and back.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import bitcompile
from bitcompile.kernels import native
from bitcompile.kernels.cpu import library
from bitcompile.runtime import decode_attention
from bitcompile.runtime.compiled_decode import compile_decoder

pytestmark = pytest.mark.skipif(not library.available(), reason="the C kernels are not built")


@pytest.fixture(scope="module")
def op():
    if not native.load():
        pytest.skip(f"C++ operators unavailable: {native.unavailable_reason()}")
    return torch.ops.bitcpm_native.decode_attention


def _reference(q, k, v, mask, scale):
    """Per (sequence, head): weights = softmax over positions of scale * q.k_s (+ mask), out = sum w_s v_s;
    query head h reads KV head h // (H / Hkv). Returns (B, 1, H, D), float64."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, 1, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            scores = (k[b, g].double() @ q[b, h, 0].double()) * scale
            if mask is not None:
                m = mask.expand(B, H, 1, S)[b, h, 0]
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.double()
            if torch.isinf(scores).all():
                continue  # nothing to attend to: zeros (what torch's CPU SDPA returns)
            weights = torch.softmax(scores, dim=0)
            out[b, 0, h] = weights @ v[b, g].double()
    return out


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "bool_per_head"])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_decode_attention_matches_the_formula(op, heads, kv_heads, mask_kind, head_dim):
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    B, S = 2, 37
    q = torch.randn(B, 1, heads, head_dim, generator=g).transpose(1, 2)  # strided, as the projection gives it
    k = torch.randn(B, kv_heads, S, head_dim, generator=g)
    v = torch.randn(B, kv_heads, S, head_dim, generator=g)
    mask = None
    if mask_kind.startswith("bool"):
        mask = torch.rand(B, heads if mask_kind == "bool_per_head" else 1, 1, S, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(B, 1, 1, S, generator=g)
    out = op(q, k, v, mask, 0.125)
    assert out.shape == (B, 1, heads, head_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, 0.125), rtol=1e-5, atol=2e-6)


def test_decode_attention_agrees_with_sdpa_on_a_static_cache_and_zeros_where_all_is_masked(op):
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 9, 1, 64, generator=g), torch.randn(1, 3, 300, 64, generator=g), torch.randn(1, 3, 300, 64, generator=g)
    mask = torch.zeros(1, 1, 1, 300, dtype=torch.bool)
    mask[..., :129] = True  # written positions of a static cache
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(op(q, k, v, mask, 0.125), sdpa.transpose(1, 2), rtol=1e-5, atol=2e-6)
    nothing = torch.zeros_like(mask)
    assert torch.equal(op(q, k, v, nothing, 0.125), torch.zeros(1, 1, 9, 64))


def test_decode_attention_rejects_bad_input_naming_the_op(op):
    q, k = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 10, 64)
    with pytest.raises(RuntimeError, match=r"decode_attention: one query per sequence \(decode\), got 2"):
        op(torch.randn(1, 9, 2, 64), k, k, None, 0.1)
    with pytest.raises(RuntimeError, match="decode_attention: 9 query heads are not a multiple of 4 KV heads"):
        op(q, torch.randn(1, 4, 10, 64), torch.randn(1, 4, 10, 64), None, 0.1)
    with pytest.raises(RuntimeError, match="decode_attention: q, k, v must be 4-D CPU float32"):
        op(q.bfloat16(), k, k, None, 0.1)
    with pytest.raises(RuntimeError, match=r"decode_attention: k and v must be"):
        op(q, k, torch.randn(1, 3, 11, 64), None, 0.1)
    with pytest.raises(RuntimeError, match=r"decode_attention: mask must be bool or float32"):
        op(q, k, k, torch.ones(1, 1, 1, 10, dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match=r"decode_attention: mask must be bool or float32"):
        op(q, k, k, torch.ones(1, 1, 1, 9, dtype=torch.bool), 0.1)


def test_the_attention_function_hands_what_it_does_not_cover_to_sdpa(op):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 9, 5, 64, generator=g), torch.randn(1, 3, 5, 64, generator=g), torch.randn(1, 3, 5, 64, generator=g)
    ours, _ = decode_attention.decode_attention_forward(module, q, k, v, None, scaling=0.125)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    assert torch.equal(ours, theirs)  # 5 query tokens: SDPA itself
    one, _ = decode_attention.decode_attention_forward(module, q[:, :, -1:], k, v, None, scaling=0.125)
    sdpa_one, _ = sdpa_attention_forward(module, q[:, :, -1:], k, v, None, scaling=0.125)
    torch.testing.assert_close(one, sdpa_one, rtol=1e-5, atol=2e-6)  # one token: the op
    bf16, _ = decode_attention.decode_attention_forward(module, q[:, :, -1:].bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.125)
    assert bf16.dtype == torch.bfloat16  # not covered: SDPA


def _tiny_llama(attn: str = "sdpa"):
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return bitcompile.pack(transformers.LlamaForCausalLM(config).eval(), head="int8")


def test_compile_decoder_switches_sdpa_models_to_the_op_and_back(op):
    model = _tiny_llama()
    prompt = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=8, do_sample=False)
    decoder = compile_decoder(model, max_cache_len=24, inner="aot_eager")
    assert model.config._attn_implementation == decode_attention.ATTENTION_NAME
    assert "decode_attention" in decoder.attention
    assert torch.equal(decoder.greedy(prompt, 8), eager)
    # another batch size: its own static cache and graphs
    assert torch.equal(decoder.greedy(prompt[:1], 8), eager[:1])
    decoder.uninstall()
    assert model.config._attn_implementation == "sdpa"

    eager_model = _tiny_llama("eager")
    kept = compile_decoder(eager_model, max_cache_len=24, inner="aot_eager")
    assert eager_model.config._attn_implementation == "eager" and "kept 'eager'" in kept.attention
    kept.uninstall()
