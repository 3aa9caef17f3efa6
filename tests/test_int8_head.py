"""pack(head="int8"): the output head (and the embedding tied to it) as per-row int8, run W8A8.

Checked against the formulas written out here (per-row absmax int8 weights, per-token absmax
int8 activations, exact integer sums), for every ISA; the model-level error against the fp32
head is bounded; checkpoints round-trip bit-exactly and bad ones fail naming the tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import bitcompile
from bitcompile import CheckpointError
from bitcompile.kernels import cpu, reference
from bitcompile.models import TinyLlama, TinyLlamaConfig, greedy_generate_cached
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear


def int8_rows(w):
    """Independent per-row absmax int8: s = max|w| / 127, q = round(w / s) in [-127, 127]."""
    s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-5) / 127
    return torch.round(w / s).clamp(-127, 127), s


def w8a8(x, w, b):
    qw, sw = int8_rows(w)
    sx = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-5) / 127
    qx = torch.round(x / sx).clamp(-128, 127)
    return (qx.double() @ qw.double().t()) * sw.double().t() * sx.double() + (0 if b is None else b.double())


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request, monkeypatch):
    if not cpu.isa_supported(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("BITCOMPILE_ISA", request.param)


@pytest.mark.parametrize("shape", [(1, 5, 7), (1, 67, 576), (3, 33, 1000), (9, 4, 64), (130, 9, 129)])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_kernel_matches_the_formulas(isa, shape, bias):
    m, n, k = shape
    g = torch.Generator().manual_seed(m + n + k)
    x, w = torch.randn(m, k, generator=g) * 2, torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    codes, scales = reference.quantize_rows_int8(w)
    assert torch.equal(codes.double(), int8_rows(w)[0]) and torch.allclose(scales, int8_rows(w)[1])
    got = cpu.int8_dense_linear(x, codes, scales, b, torch.float32)
    assert torch.equal(got, reference.int8_dense_linear(x, codes, scales, b, torch.float32))  # same roundings
    torch.testing.assert_close(got.double(), w8a8(x, w, b), rtol=1e-5, atol=1e-4)
    for bad_scales in (torch.ones(n), torch.ones(n + 1, 1)):
        with pytest.raises(ValueError, match=r"fp32 \(N, 1\) scales"):
            cpu.int8_dense_linear(x, codes, bad_scales, b, torch.float32)


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    return TinyLlama(TinyLlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96)).eval()


def test_int8_head_ties_the_embedding_and_bounds_the_error():
    model = _tiny_llama()
    tokens = torch.randint(0, 300, (2, 12))
    float_head = bitcompile.pack(copy.deepcopy(model))
    packed = bitcompile.pack(copy.deepcopy(model), head="int8")
    assert isinstance(packed.lm_head, Int8Linear) and isinstance(packed.embed_tokens, Int8Embedding)
    assert packed.lm_head.codes is packed.embed_tokens.codes and packed.lm_head.scales is packed.embed_tokens.scales
    reason = {d.name: d.reason for d in packed.bitcompile_pack_plan}["lm_head"]
    assert "int8 (W8A8), tied to embed_tokens" in reason
    # embedding rows are within half an int8 step of the float rows
    w = model.embed_tokens.weight.detach()
    rows = packed.embed_tokens(torch.arange(300))
    assert ((rows - w).abs() <= int8_rows(w)[1] / 2 + 1e-7).all()
    with torch.no_grad():
        want, got = float_head(tokens), packed(tokens)
    # the int8 head and embedding add a small relative error to the logits; the argmax rarely moves
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # the tied fp32 table is gone: the int8 codes + scales replace it once
    nbytes = lambda m: sum(t.nbytes for t in {id(t): t for t in m.state_dict(keep_vars=True).values()}.values())  # noqa: E731
    assert nbytes(float_head) - nbytes(packed) == 300 * 64 * 4 - (300 * 64 + 300 * 4)


def test_int8_head_generates_under_eager_and_compile():
    model = bitcompile.pack(_tiny_llama(), head="int8")
    prompt = torch.randint(0, 300, (1, 6))
    eager = greedy_generate_cached(model, prompt, 6)
    compiled = greedy_generate_cached(
        model, prompt, 6, forward=torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    )
    assert torch.equal(eager, compiled)


def test_int8_head_on_a_hugging_face_llama_generates():
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = bitcompile.pack(transformers.LlamaForCausalLM(config).eval(), head="int8")
    assert isinstance(model.get_input_embeddings(), Int8Embedding) and isinstance(
        model.get_output_embeddings(), Int8Linear
    )
    out = model.generate(torch.randint(0, 500, (1, 8)), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_int8_head_errors_are_clear_and_leave_the_model_untouched():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no nn.Linear output head"):
        bitcompile.pack(model, head="int8")
    with pytest.raises(ValueError, match="head='fp8' is not one of"):
        bitcompile.pack(model, head="fp8")
    untied = _tiny_llama()
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())  # untied
    with pytest.raises(ValueError, match="'lm_head' would be packed ternary; keep it out of ternary"):
        bitcompile.pack(untied, bitcompile.TernaryConfig(float_roles=()), head="int8")  # opted in: ternary head
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    assert type(untied.lm_head) is nn.Linear and type(untied.embed_tokens) is nn.Embedding
    excluded = bitcompile.pack(untied, bitcompile.TernaryConfig(exclude=["lm_head"], float_roles=()), head="int8")
    assert isinstance(excluded.lm_head, Int8Linear) and type(excluded.embed_tokens) is nn.Embedding
    by_default = bitcompile.pack(copy.deepcopy(_tiny_llama()), head="int8")  # the default keeps heads float: int8 it
    assert isinstance(by_default.lm_head, Int8Linear)


def _metadata(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return handle.metadata()


def test_int8_head_checkpoint_round_trip_and_bad_codes(tmp_path):
    model = bitcompile.pack(_tiny_llama(), head="int8")
    tokens = torch.randint(0, 300, (1, 9))
    bitcompile.save_packed(model, tmp_path)
    loaded = bitcompile.load_packed(tmp_path, _tiny_llama(seed=1))
    assert loaded.lm_head.codes is loaded.embed_tokens.codes
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    # a head with the code -128 is neither saved nor loaded, naming the tensor
    from safetensors.torch import load_file, save_file

    model.embed_tokens.codes[3, 5] = -128
    with pytest.raises(CheckpointError, match=r"save_packed: not writing .*'embed_tokens.codes' holds the int8 code -128"):
        bitcompile.save_packed(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    (tmp_path / "bad").mkdir(exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["embed_tokens.codes"][3, 5] = -128
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata=_metadata(tmp_path))
    with pytest.raises(CheckpointError, match=r"codes' holds the int8 code -128"):
        bitcompile.load_packed(tmp_path / "bad", _tiny_llama())
    # loading into a model whose vocabulary differs names the layer
    other = TinyLlama(TinyLlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=96))
    with pytest.raises(CheckpointError, match="embed_tokens"):
        bitcompile.load_packed(tmp_path, other)


def test_int8_head_exports_to_onnx_with_one_int8_table():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import tempfile

    model = bitcompile.pack(_tiny_llama(), head="int8")
    ids = torch.randint(0, 300, (1, 8))
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.onnx"
        bitcompile.export_onnx(model, (ids,), path)
        session = ort.InferenceSession(path)
        got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        graph = onnx.load(path).graph
    with torch.no_grad():
        want = model(ids)
    # the same int8 codes, exact int32 sums, the same order of roundings: fp32-rounding close
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    int8_tables = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_tables == ["lm_head.codes"]  # the tied embedding's Gather reads the same initializer
    assert "MatMulInteger" in {n.op_type for n in graph.node}


@pytest.mark.parametrize("head", ["float", "int8"])
def test_explain_lists_the_head_a_packed_model_keeps(head):
    model = bitcompile.pack(_tiny_llama(), head=head)
    with torch.no_grad():  # the no-grad path: the head is one bitcpm extern op, not F.linear
        report = bitcompile.explain(model, torch.randint(0, 300, (1, 8)), inner="aot_eager")
    layers = {layer.name: layer for graph in report.graphs for layer in graph.layers}
    assert not layers["lm_head"].rewritten
    expected = "int8 head (W8A8" if head == "int8" else "shared with an embedding"
    assert expected in layers["lm_head"].reason
    assert sum(layer.rewritten for layer in layers.values()) == 7 * 2  # every packed layer, once


def test_int8_head_follows_replaced_codes_and_checks_its_bias():
    model = bitcompile.pack(_tiny_llama(), head="int8")
    head = model.lm_head
    x = torch.randn(1, 64)
    with torch.no_grad():
        head(x)
        head.codes.data = -head.codes.data  # moved data: the row sums must follow
        want = reference.int8_dense_linear(x, head.codes, head.scales, None, torch.float32)
        assert torch.equal(head(x), want)
    with pytest.raises(ValueError, match=r"bias must have shape \(300,\)"):
        cpu.int8_dense_linear(x, head.codes, head.scales, torch.zeros(1), torch.float32)


def test_ternary_only_checkpoints_stay_format_1(tmp_path):
    import json

    from safetensors import safe_open

    bitcompile.save_packed(bitcompile.pack(_tiny_llama()), tmp_path / "a")
    bitcompile.save_packed(bitcompile.pack(_tiny_llama(), head="int8"), tmp_path / "b")
    versions = []
    for name in ("a", "b"):
        with safe_open(str(tmp_path / name / "model.safetensors"), framework="pt") as handle:
            versions.append(handle.metadata()["format_version"])
            int8_layers = json.loads(handle.metadata()["int8_layers"])
            assert sorted(int8_layers) == ([] if name == "a" else ["embed_tokens", "lm_head"])
    assert versions == ["1", "2"]


def test_gradients_flow_through_the_int8_head():
    model = bitcompile.pack(_tiny_llama(), head="int8")
    hidden = torch.randn(2, 3, 64, requires_grad=True)
    y = model.lm_head(hidden)
    g = torch.randn_like(y)
    y.backward(g)
    w = model.lm_head.codes.double() * model.lm_head.scales.double()
    torch.testing.assert_close(hidden.grad.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(y.detach(), model.lm_head(hidden))


@pytest.mark.parametrize("how", ["codes.data.copy_", "load_state_dict of inference tensors"])
def test_int8_head_follows_writes_its_version_counter_misses(isa, how):
    """Regression (issue 15): the row sums of the codes (the VNNI kernel's x + 128 correction)
    were cached by data pointer and version, stale after these writes."""
    g = torch.Generator().manual_seed(4)
    new_w, w, x = torch.randn(33, 70, generator=g), torch.randn(33, 70, generator=g), torch.randn(2, 70, generator=g)
    with torch.inference_mode(how.startswith("load_state_dict")):
        head = Int8Linear.from_weight(w, None)
        head(x)  # served once before the write
        if how == "codes.data.copy_":
            codes, scales = reference.quantize_rows_int8(new_w)
            head.codes.data.copy_(codes)
            head.scales.data.copy_(scales)
        else:
            head.load_state_dict(Int8Linear.from_weight(new_w, None).state_dict())
        torch.testing.assert_close(head(x).double(), w8a8(x, new_w, None), rtol=1e-5, atol=1e-4)
