"""export_genai: a KV-cache ONNX folder that onnxruntime-genai loads and generates from.

One tiny transformers Llama is QAT-trained (a few steps through ``bitcpm``, on a token cycle), packed with the
int8 head and exported once per module. Checks: the folder and graph interface
onnxruntime-genai expects, greedy tokens from ``onnxruntime_genai`` equal to the packed
PyTorch model's ``generate`` for 40 new tokens, every cache step's logits against the packed
model (tolerance: docs/onnx.md, "Numerics"), the fp32 cache graph against the float model
(no quantization: the cache and attention math alone), and bad input. The real SmolLM2
checkpoint takes minutes to export on 2 cores: benchmarks/bench_genai.py checks it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bitcompile
from bitcompile.data.synthetic_text import random_batches

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed: pip install 'bitcompile[onnx]'")
onnx = pytest.importorskip("onnx")

from bitcompile.export.genai import export_decoder_with_cache, export_genai  # noqa: E402
from bitcompile.export.kv_cache import cache_input_names, cache_output_names  # noqa: E402
from bitcompile.export.results import OnnxExportError  # noqa: E402

LLAMA_TOL = 0.01  # of max|logit|, as tests/test_onnx_export.py (docs/onnx.md: K > block_size requantizes per block)
NEW_TOKENS = 40
QAT_STEPS = 25
VOCAB = 32


def _config(vocab_size: int) -> transformers.LlamaConfig:
    # intermediate 192 > block 128: down_proj exercises onnxruntime's per-block requantization.
    # EOS is an extra token the text never holds, so greedy runs do not stop early.
    return transformers.LlamaConfig(
        vocab_size=vocab_size + 1, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=vocab_size,
    )  # fmt: skip


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    """(float QAT model, packed copy with int8 head, export result, token stream)."""
    torch.manual_seed(0)
    cycle = torch.randperm(VOCAB)  # each token has one successor: learnable in a few steps, diverse greedy output
    tokens = cycle.repeat(200)
    model = transformers.LlamaForCausalLM(_config(VOCAB))
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for inputs, targets in random_batches(tokens, 8, 32, QAT_STEPS, seed=0):
        loss = F.cross_entropy(compiled(input_ids=inputs).logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it learned the cycle
    model.eval()
    torch._dynamo.reset()
    packed = bitcompile.pack(copy.deepcopy(model), head="int8")
    with pytest.warns(bitcompile.BitcompileWarning, match="no tokenizer"):
        result = export_genai(packed, tmp_path_factory.mktemp("genai") / "qat")
    return model, packed, result, tokens


def test_folder_has_the_graph_and_config_onnxruntime_genai_expects(qat):
    _, packed, result, _ = qat
    assert sorted(result.files) == ["genai_config.json", "model.onnx"]
    assert len(result.ternary_layers) == 14 and all(layer.kind == "matmulnbits" for layer in result.ternary_layers)
    graph = onnx.load(str(result.folder / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert [v.name for v in graph.input] == ["input_ids", "attention_mask", "position_ids", *cache_input_names(2)]
    assert [v.name for v in graph.output] == ["logits", *cache_output_names(2)]
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and all({a.name: a.i for a in n.attribute}["bits"] == 2 for n in nbits)
    assert any(n.op_type == "MatMulInteger" for n in graph.node)  # the int8 head
    config = json.loads((result.folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["vocab_size"] == packed.config.vocab_size


def test_onnxruntime_genai_greedy_tokens_equal_the_packed_model(qat):
    _, packed, result, tokens = qat
    model = og.Model(str(result.folder))
    for start in (100, 2000):
        prompt = tokens[start : start + 12].tolist()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        got = [int(t) for t in generator.get_sequence(0)]
        with torch.no_grad():
            want = packed.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        assert len(got) == len(prompt) + NEW_TOKENS
        assert got == want, f"first divergence at new token {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b) - len(prompt)}"
        assert len(set(got[len(prompt) :])) > 8  # a trained model, not one repeated token


def _ort_step(session, ids, mask, positions, cache):
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({name: c for name, c in zip(cache_input_names(len(cache) // 2), cache)})
    logits, *present = session.run(None, feeds)
    return logits, present


def _decode_matches(path, model, tokens, tolerance):
    """Prefill 2 × 9 tokens, then 6 single-token steps through the cache; compare with ``model`` every step."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.stack([tokens[0:15], tokens[500:515]])
    layers, kv_heads, head_dim = model.config.num_hidden_layers, model.config.num_key_value_heads, 16
    cache = [np.zeros((2, kv_heads, 0, head_dim), np.float32) for _ in range(2 * layers)]
    for start, stop in [(0, 9), *[(i, i + 1) for i in range(9, 15)]]:
        ids = batch[:, start:stop]
        logits, cache = _ort_step(session, ids, torch.ones(2, stop, dtype=torch.int64), torch.arange(start, stop).expand(2, -1), cache)
        assert cache[0].shape == (2, kv_heads, stop, head_dim)
        with torch.no_grad():
            want = model(batch[:, :stop], use_cache=False).logits[:, start:stop].numpy()
        assert np.abs(logits - want).max() / np.abs(want).max() < tolerance, (start, stop)


def test_every_cache_step_matches_the_packed_model(qat):
    _, packed, result, tokens = qat
    _decode_matches(result.folder / "model.onnx", packed, tokens, LLAMA_TOL)


def test_fp32_cache_graph_equals_the_float_model_and_left_padding_is_masked(qat, tmp_path):
    model, _, _, tokens = qat
    float_model = copy.deepcopy(model)
    layers = export_decoder_with_cache(float_model, tmp_path / "fp32.onnx")
    assert layers == []  # nothing ternary: the fp32 baseline
    _decode_matches(tmp_path / "fp32.onnx", float_model, tokens, 1e-5)
    # Left padding: row 1 has 3 pad tokens; its real tokens' logits equal the unpadded run.
    session = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.stack([tokens[0:8], torch.cat([torch.zeros(3, dtype=torch.long), tokens[0:5]])])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = [np.zeros((2, 2, 0, 16), np.float32) for _ in range(4)]
    logits, _ = _ort_step(session, ids, mask, positions, cache)
    with torch.no_grad():
        want = float_model(tokens[0:5][None]).logits[0].numpy()
    np.testing.assert_allclose(logits[1, 3:], want, rtol=1e-4, atol=1e-4)


def test_bad_input_fails_clearly_and_leaves_the_model_alone(qat, tmp_path):
    model, _, result, _ = qat
    with pytest.raises(FileExistsError, match="not empty"):
        export_genai(model, result.folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnnxExportError, match="is a file"):
        export_genai(model, tmp_path / "file")
    with pytest.raises(TypeError, match="transformers causal LM"):
        export_genai(torch.nn.Linear(4, 4), tmp_path / "out")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(OnnxExportError, match="model_type 'gpt2' is not supported"):
        export_genai(gpt2, tmp_path / "out")
    with pytest.raises(OnnxExportError, match="does not exist"):
        export_genai(model, tmp_path / "missing" / "out")
    no_eos = copy.deepcopy(model)
    no_eos.config.eos_token_id = no_eos.generation_config.eos_token_id = None
    with pytest.raises(OnnxExportError, match="no eos_token_id"):
        export_genai(no_eos, tmp_path / "out")
    assert all(isinstance(m, torch.nn.Linear) for m in model.modules() if "proj" in type(m).__name__.lower())
    assert not any(isinstance(m, bitcompile.PackedTernaryLinear) for m in model.modules())  # float model untouched


def test_cli_export_genai(tmp_path, capsys):
    from bitcompile.cli import main

    assert main(["export", "x:y", "-o", str(tmp_path / "g"), "--format", "genai", "--static"]) == 2
    assert "--static and --opset do not apply" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "g"), "--format", "genai"]) == 1
    assert "error" in capsys.readouterr().err
