"""The AOTInductor decode step of compile_decoder (bitcompile.runtime.aoti_decode).

The step must give the eager packed model's logits and greedy tokens, write the KV cache the
prefill graph reads (one shared cache: user-managed constants, not copies), run no bitcompile
Python per layer, follow a buffer replaced on the model, and say so when it cannot be built.
One decoder is compiled per module (inductor + AOTInductor: ~30 s on 2 cores).
"""

from __future__ import annotations


import pytest
import torch
import transformers

import bitcompile
from bitcompile.kernels import native
from bitcompile.kernels.cpu import library
from bitcompile.runtime import aoti_decode
from bitcompile.runtime.compiled_decode import compile_decoder
from tests.python_frames import bitcompile_frames

pytestmark = pytest.mark.skipif(not library.available(), reason="the C kernels are not built")

PROMPT = 7


def _tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    return bitcompile.pack(transformers.LlamaForCausalLM(config).eval(), head="int8")


def _eager_logits(forward, ids):
    """Logits of every position of ``ids`` from the uncompiled packed model's ``forward``, one
    token at a time after the prompt (its own cache): the reference for the decode steps."""
    cache = transformers.DynamicCache()
    out = [forward(ids[:, :PROMPT], cache=cache, use_cache=True).logits[:, -1:]]
    for i in range(PROMPT, ids.shape[1] - 1):
        out.append(forward(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def compiled():
    if not native.load():
        pytest.skip(f"C++ operators unavailable: {native.unavailable_reason()}")
    model = _tiny_llama()
    prompt = torch.randint(0, 300, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager_ids = model.generate(prompt, max_new_tokens=10, do_sample=False)
        eager_logits = _eager_logits(model.forward, eager_ids)
    decoder = compile_decoder(model, max_cache_len=32, cpp_wrapper=False)
    yield model, decoder, prompt, eager_ids, eager_logits
    decoder.uninstall()


def test_the_aoti_step_gives_the_eager_tokens_and_logits(compiled):
    model, decoder, prompt, eager_ids, eager_logits = compiled
    assert decoder.decode_path == "aoti", decoder.decode_path_reason
    assert torch.equal(decoder.greedy(prompt, 10), eager_ids)
    step = decoder._aoti_steps[1]
    assert step.native_ops == {"ternary_linear_packed": 14, "int8_dense_linear": 1}  # every layer a C++ op

    cache = decoder.static_cache()
    cache.reset()
    with torch.no_grad():
        logits = [decoder.prefill(prompt, cache)]
        for i in range(PROMPT, eager_ids.shape[1] - 1):
            logits.append(decoder.decode_step(eager_ids[:, i : i + 1], i, cache))
    logits = torch.cat(logits, dim=1)
    # inductor fuses the norms and rotary in another summation order than eager; where that moves
    # an activation across an int8 rounding boundary a logit moves by ~1e-3 (a stale or wrong
    # weight moves them by > 1e-2, see the replaced-buffer test)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-3, atol=2e-3)


def _prefilled(decoder, prompt):
    """The decoder's own cache, reset and filled with ``prompt`` by the prefill graph."""
    cache = decoder.static_cache()
    cache.reset()
    with torch.no_grad():
        decoder.prefill(prompt, cache)
    return cache


def test_the_aoti_step_writes_the_cache_the_prefill_graph_fills(compiled):
    model, decoder, prompt, eager_ids, _ = compiled
    cache = _prefilled(decoder, prompt)
    with torch.no_grad():
        prompt_keys = cache.layers[1].keys[:, :, :PROMPT].clone()
        decoder.decode_step(eager_ids[:, PROMPT : PROMPT + 1], PROMPT, cache)
        reference = transformers.DynamicCache(config=model.config)
        decoder._eager_forward(eager_ids[:, : PROMPT + 1], cache=reference, use_cache=True)
    keys = cache.layers[1].keys
    assert torch.equal(keys[:, :, :PROMPT], prompt_keys)  # the step read the prefill's slots, left them
    torch.testing.assert_close(keys[:, :, PROMPT], reference.layers[1].keys[:, :, PROMPT], rtol=1e-5, atol=1e-5)
    assert not keys[:, :, PROMPT + 1 :].any()  # and wrote its own slot only


def test_a_decode_step_runs_no_bitcompile_python_per_layer(compiled):
    _, decoder, prompt, eager_ids, _ = compiled
    cache = _prefilled(decoder, prompt)
    with torch.no_grad():
        frames = bitcompile_frames(lambda: decoder.decode_step(eager_ids[:, PROMPT : PROMPT + 1], PROMPT, cache))
    assert frames and set(frames) <= {"compiled_decode.py:decode_step", "aoti_decode.py:__call__"}, frames


def test_a_replaced_buffer_is_followed_and_a_reshaped_one_refused(compiled):
    model, decoder, prompt, eager_ids, eager_logits = compiled
    layer = model.model.layers[0].mlp.down_proj
    original = layer.scales
    cache = decoder.static_cache()
    try:
        layer.scales = -original  # a new tensor: the library had bound the old one
        with torch.no_grad():
            expected = _eager_logits(decoder._eager_forward, eager_ids)
            cache.reset()
            logits = [decoder.prefill(prompt, cache)]  # a new sequence rebinds the constants
            for i in range(PROMPT, eager_ids.shape[1] - 1):
                logits.append(decoder.decode_step(eager_ids[:, i : i + 1], i, cache))
        assert not torch.allclose(expected, eager_logits, rtol=1e-2, atol=1e-2)  # the change shows
        torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=1e-3, atol=2e-3)
        assert decoder._aoti_steps[1]._bound["model.model.layers.0.mlp.down_proj.scales"] is layer.scales
        layer.scales = torch.ones(original.shape[0] + 1, 1)
        with pytest.raises(RuntimeError, match=r"model.model.layers.0.mlp.down_proj.scales changed .*compile the decoder again"):
            decoder.greedy(prompt, 2)
    finally:
        layer.scales = original
    assert decoder._aoti_steps[1].refresh()
    assert torch.equal(decoder.greedy(prompt, 4), eager_ids[:, : PROMPT + 4])


def test_bad_token_ids_are_refused_naming_the_shape(compiled):
    _, decoder, _, _, _ = compiled
    decoder.static_cache()
    step = decoder._aoti_steps[1]
    with pytest.raises(ValueError, match=r"expected int64 token ids of shape \(1, 1\), got torch.int64 \(1, 2\)"):
        step(torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"got torch.int32 \(1, 1\)"):
        step(torch.zeros(1, 1, dtype=torch.int32), 3)


def test_decode_step_arguments_are_checked():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="decode_step must be one of"):
        compile_decoder(model, decode_step="cudagraphs")
    with pytest.raises(ValueError, match="needs inner='inductor'"):
        compile_decoder(model, inner="aot_eager", decode_step="aoti")
    assert "forward" not in model.__dict__
    decoder = compile_decoder(model, inner="aot_eager")
    assert decoder.decode_path == "dynamo"
    decoder.uninstall()


def test_a_step_export_cannot_trace_keeps_dynamo_and_says_why(monkeypatch):
    if not native.load():
        pytest.skip(f"C++ operators unavailable: {native.unavailable_reason()}")

    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("data-dependent branch (test)")

    monkeypatch.setattr(aoti_decode, "export_decode_step", refuse)
    model = _tiny_llama(seed=3)
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=3, do_sample=False)
    decoder = compile_decoder(model, max_cache_len=16, cpp_wrapper=False)
    with pytest.warns(bitcompile.BitcompileWarning, match=r"decode step could not be built .*data-dependent branch \(test\)"):
        ids = decoder.greedy(prompt, 3)
    assert decoder.decode_path == "dynamo" and "data-dependent branch (test)" in decoder.decode_path_reason
    assert torch.equal(ids, eager)
    decoder.uninstall()


def test_generate_routes_its_plain_steps_to_the_aoti_step(compiled, monkeypatch):
    model, decoder, prompt, eager_ids, _ = compiled
    calls = []
    decoder.static_cache()  # compiles the step if no test before did
    step = decoder._aoti_steps[1]
    original = type(step).__call__

    def counted(self, token, position):
        calls.append(position)
        return original(self, token, position)

    monkeypatch.setattr(type(step), "__call__", counted)
    with torch.no_grad():
        ids = decoder.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(ids, eager_ids[:, : PROMPT + 6])
    assert calls == list(range(PROMPT, PROMPT + 5))  # every step after the prefill's token
    calls.clear()
    padded = torch.cat([torch.zeros(1, 1, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.ones_like(prompt)], dim=1)
    with torch.no_grad():
        ids = decoder.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert calls == []  # padding: the Dynamo graphs, which take the mask
    assert torch.equal(ids[:, 1:], eager_ids[:, : PROMPT + 3])
    with pytest.raises(ValueError, match="passes its own static cache"):
        decoder.generate(prompt, cache=transformers.DynamicCache(), max_new_tokens=2)


def test_a_position_outside_the_cache_is_refused(compiled):
    _, decoder, _, _, _ = compiled
    decoder.static_cache()
    with pytest.raises(ValueError, match=r"position 32 is outside the static cache \(0..31\)"):
        decoder._aoti_steps[1](torch.zeros(1, 1, dtype=torch.long), 32)
