"""ONNX export (issue 5): layouts, parity with the packed PyTorch model, fusion, sizes, errors.

Tolerances. onnxruntime runs MatMulNBits with ``accuracy_level=4``: it quantizes the
activations to int8 *per block of 128 (or 32/64) along K*, while the packed PyTorch model
quantizes per token. The exporter emits the per-token quantize → dequantize explicitly,
so the only difference left is onnxruntime's re-quantization of those values per block
(at most half a block step per element; none at all when K <= block size). Measured on
one layer (K=N=1024): 0.6% of max|y| (Gaussian inputs), 1.7% with 1% outlier channels;
on an MLP (two layers) ~1.5%, on the tiny Llama's logits ~0.1%. Assertions use about
twice the measured error. The layout converters themselves are checked *exactly*
(accuracy_level=0 / no fusion: fp32 math, 1e-5).

Packing uses ``target="reference"`` so these tests do not depend on the C kernels' build
state; the exported graph does not depend on the kernel.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import bitcompile
from bitcompile import PackedTernaryLinear
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig
from bitcompile.models.tiny_llama import greedy_generate

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from bitcompile.export.layouts import block_size_for, to_int2_dequantize_linear, to_matmulnbits  # noqa: E402
from bitcompile.export.onnx import OnnxExportError, check_ort_fusion, export_onnx  # noqa: E402
from bitcompile.kernels import reference  # noqa: E402

REF = dict(target="reference")
MLP_TOL = 0.03  # of max|y|: measured 1.2-1.5% on two ternary layers
LLAMA_TOL = 0.01  # of max|logit|: measured 0.1% (tiny Llama), 3e-7 (HF tiny Llama: every K <= 128)


def session(path, level=None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, *inputs):
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})[0]


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- converters: exact, checked against onnxruntime's fp32 paths --------------------------------


def test_matmulnbits_bytes_are_low_bits_first_with_code_w_plus_2():
    codes = torch.tensor([[-1, 0, 1, 1] + [0] * 28], dtype=torch.int8)
    blob, scales = to_matmulnbits(codes, torch.tensor([[0.5]]), -1, 32)
    assert blob.shape == (1, 1, 8) and scales.shape == (1, 1)
    assert blob[0, 0, 0] == 1 | 2 << 2 | 3 << 4 | 3 << 6 and (blob[0, 0, 1:] == 0b10101010).all()


@pytest.mark.parametrize("group, k", [(-1, 200), (0, 256), (32, 200), (64, 256), (128, 300), (256, 512), (96, 200)])
def test_converters_compute_the_dequantized_weight_exactly(group, k):
    """MatMulNBits (accuracy_level=0: fp32 math) and INT2 DQ → MatMul (no fusion) equal x @ W_q^T."""
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(0)
    n = 12  # not a multiple of 4: INT2 rows do not end on a byte
    codes, scales = reference.quantize_weight(torch.randn(n, k), group)
    block = block_size_for(group)
    x = torch.randn(3, k)
    want = (x @ reference.dequantize_weight(codes, scales, group).t()).numpy()

    blob, mnb_scales = to_matmulnbits(codes, scales, group, block)
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=2, block_size=block, accuracy_level=0
    )  # fmt: skip
    inits = [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(mnb_scales, "s")]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    weight, dq_scales = to_int2_dequantize_linear(codes, scales, group, block)
    assert weight.shape == (k, n) and dq_scales.shape == (-(-k // block), n)
    nodes = [
        helper.make_node("DequantizeLinear", ["W", "s"], ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(dq_scales, "s")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=13)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(
        model.SerializeToString(), ort.SessionOptions(), providers=["CPUExecutionProvider"],
        disabled_optimizers=["QDQSelectorActionTransformer"],
    )  # fmt: skip
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], want, rtol=1e-5, atol=1e-5)


def test_block_size_choice():
    assert [block_size_for(g) for g in (-1, 0, 32, 64, 128, 256, 96, 48, 16)] == [128, 128, 32, 64, 128, 128, 32, None, None]


# ---- MLP: parity, dynamic batch, sizes, the user's model untouched -------------------------------


@pytest.mark.parametrize("activations", ["int8", None])
def test_mlp_unpacked_model_exports_a_packed_copy_with_parity_and_10x_smaller_weights(tmp_path, activations):
    torch.manual_seed(0)
    model = MLP(256, [512], 128).eval()
    before = copy.deepcopy(model.state_dict())
    config = bitcompile.TernaryConfig(activations=activations, **REF)
    result = export_onnx(model, (torch.randn(4, 256),), tmp_path / "mlp.onnx", config=config)

    # The user's model is untouched: still nn.Linear, same tensors.
    assert not any(isinstance(m, PackedTernaryLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.packed_copy and result.check == "passed" and result.format == "matmulnbits"
    onnx.checker.check_model(str(result.path), full_check=True)
    proto = onnx.load(str(result.path))
    assert {o.domain: o.version for o in proto.opset_import}.get("com.microsoft") == 1
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and len(result.ternary_layers) == 2
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        # No optional attribute written with a default (older runtimes reject unknown ones).
        assert set(attrs) == {"K", "N", "bits", "block_size", "accuracy_level"}
        assert attrs["bits"] == 2 and attrs["block_size"] == 128 and attrs["accuracy_level"] == 4
        assert len(node.input) == 6 and node.input[3] == node.input[4] == ""  # bias, no zero points

    packed = bitcompile.pack(copy.deepcopy(model), config)
    sess = session(result.path)
    for batch in (4, 1, 9):  # dynamic batch, including 1
        x = torch.randn(batch, 256)
        with torch.no_grad():
            want = packed(x).numpy()
        assert rel_err(run(sess, x), want) < MLP_TOL

    if activations is None:
        return  # the sizes below do not depend on the activation mode
    # Size against an fp32 export of the same model: the linear weights shrink >= 10x.
    fp32 = torch.onnx.export(model, (torch.randn(4, 256),), dynamo=True, verbose=False)
    fp32_weights = sum(t.const_value.nbytes for n, t in fp32.model.graph.initializers.items() if n.endswith("weight"))
    assert fp32_weights == result.ternary_fp32_bytes == 4 * (256 * 512 + 512 * 128)
    assert fp32_weights / result.ternary_weight_bytes >= 10  # 2 bits + one fp32 scale per 128 weights: 14.2x
    fp32.save(str(tmp_path / "fp32.onnx"))
    assert os.path.getsize(tmp_path / "fp32.onnx") / result.file_bytes >= 8  # whole file, with fp32 biases


def test_per_token_activation_quantization_is_emitted_before_matmulnbits(tmp_path):
    """With outlier channels, per-token and per-block int8 differ most: measured 1.7% of max|y|
    with the explicit per-token quantize → dequantize, 5.3% without it (MatMulNBits alone)."""
    torch.manual_seed(0)
    model = bitcompile.pack(nn.Sequential(nn.Linear(1024, 256)), bitcompile.TernaryConfig(**REF))
    result = export_onnx(model, torch.randn(4, 1024), tmp_path / "o.onnx")
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert ops.index("ReduceMax") < ops.index("Round") < ops.index("MatMulNBits")
    x = torch.randn(16, 1024) * torch.where(torch.rand(1024) < 0.01, 20.0, 1.0)
    with torch.no_grad():
        want = model(x).numpy()
    assert rel_err(run(session(result.path), x), want) < 0.03


@pytest.mark.parametrize("group_size", [32, 64, "tensor"])
def test_group_sizes_parity_and_block_sizes(tmp_path, group_size):
    torch.manual_seed(0)
    model = bitcompile.pack(MLP(200, [96], 40), bitcompile.TernaryConfig(group_size=group_size, **REF))
    result = export_onnx(model, torch.randn(3, 200), tmp_path / "g.onnx")
    assert not result.packed_copy
    assert {layer.block_size for layer in result.ternary_layers} == {group_size if group_size != "tensor" else 128}
    x = torch.randn(5, 200)
    with torch.no_grad():
        want = model(x).numpy()
    assert rel_err(run(session(result.path), x), want) < MLP_TOL


def test_group_size_without_a_fast_block_size_stays_float_and_exact(tmp_path):
    torch.manual_seed(0)
    model = bitcompile.pack(nn.Sequential(nn.Linear(96, 48), nn.GELU(), nn.Linear(48, 8)), bitcompile.TernaryConfig(group_size=48, **REF))
    result = export_onnx(model, torch.randn(2, 96), tmp_path / "f.onnx")
    assert [(layer.name, layer.kind) for layer in result.layers] == [("0", "float"), ("2", "float")]
    assert "groups of 48" in result.layers[0].reason and "groups of 48" in result.summary()
    assert isinstance(model[0], PackedTernaryLinear)  # the user's packed model is untouched
    x = torch.randn(4, 96)
    with torch.no_grad():
        want = model(x).numpy()
    assert rel_err(run(session(result.path), x), want) < 1e-5  # float MatMul of the dequantized weight


# ---- qdq: standard ONNX, and onnxruntime really fuses every ternary layer -------------------------


class ReluSquaredBlock(nn.Module):
    """The patterns that broke DQ → MatMul fusion: projection → ReLU (3-D), 2-D + bias → ReLU/Clip, N % 4 != 0."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(64, 128, bias=bias), nn.Linear(64, 128, bias=bias)
        self.down, self.head = nn.Linear(128, 64, bias=bias), nn.Linear(64, 50, bias=bias)

    def forward(self, x):
        y = self.down(torch.relu(self.gate(x)) ** 2 * self.up(x))
        return torch.nn.functional.relu6(self.head(y))


@pytest.mark.parametrize("shape, bias, activations", [((2, 5, 64), False, None), ((6, 64), True, None), ((6, 64), True, "int8")])
def test_qdq_is_standard_onnx_and_every_ternary_layer_fuses(tmp_path, shape, bias, activations):
    torch.manual_seed(0)
    model = bitcompile.pack(ReluSquaredBlock(bias), bitcompile.TernaryConfig(activations=activations, **REF))
    result = export_onnx(model, torch.randn(*shape), tmp_path / "q.onnx", format="qdq")
    proto = onnx.load(str(result.path))
    assert {o.domain: o.version for o in proto.opset_import} == {"": 25} and proto.ir_version >= 13
    int2 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT2]
    assert sorted(t.name for t in int2) == ["down.packed", "gate.packed", "head.packed", "up.packed"]
    assert [list(t.dims) for t in int2 if t.name == "gate.packed"] == [[64, 128]]  # (K, N)
    fusion = check_ort_fusion(result.path)
    assert fusion["unfused"] == [] and fusion["matmulnbits"] == 4, fusion
    x = torch.randn(*shape)
    with torch.no_grad():
        want = model(x).numpy()
    for level in (None, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):  # fused (int8 compute) and unfused (fp32)
        assert rel_err(run(session(result.path, level), x), want) < MLP_TOL


# ---- Llama models: parity, dynamic batch and sequence, greedy generation -------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    model = bitcompile.pack(TinyLlama(TinyLlamaConfig(vocab_size=50)).eval(), bitcompile.TernaryConfig(**REF))
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return model, export_onnx(model, (torch.randint(0, 50, (1, 8)),), path)


def test_tiny_llama_parity_dynamic_axes_and_greedy_generation(tiny_llama):
    model, result = tiny_llama
    assert [layer.name for layer in result.float_layers] == ["lm_head"]  # tied to the embedding
    assert "shared with embed_tokens.weight" in result.float_layers[0].reason
    assert len(result.ternary_layers) == 14 and result.inputs == ["tokens"] and result.outputs == ["output"]
    proto = onnx.load(str(result.path))
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    sess = session(result.path)
    for shape in ((1, 8), (3, 21), (2, 1)):
        tokens = torch.randint(0, 50, shape)
        with torch.no_grad():
            want = model(tokens).numpy()
        got = run(sess, tokens)
        assert got.shape == want.shape and rel_err(got, want) < LLAMA_TOL
        assert (got.argmax(-1) == want.argmax(-1)).all()
    prompt = torch.randint(0, 50, (2, 5))
    expected = greedy_generate(model, prompt, 8)
    tokens = prompt
    for _ in range(8):  # the ONNX model has no KV cache: feed the whole sequence each step
        next_token = torch.from_numpy(run(sess, tokens)[:, -1].argmax(-1, keepdims=True))
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(tokens, expected)


def test_tiny_llama_qdq_fuses_and_matches(tmp_path, tiny_llama):
    model, _ = tiny_llama
    result = export_onnx(model, (torch.randint(0, 50, (2, 8)),), tmp_path / "tiny_qdq.onnx", format="qdq")
    fusion = check_ort_fusion(result.path)
    assert fusion["unfused"] == [] and fusion["matmulnbits"] == 14
    tokens = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        want = model(tokens).numpy()
    assert rel_err(run(session(result.path), tokens), want) < LLAMA_TOL


def test_transformers_llama_parity_and_generation(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = bitcompile.pack(
        transformers.LlamaForCausalLM(config).eval(), bitcompile.TernaryConfig(exclude=["lm_head"], **REF)
    )
    result = export_onnx(model, (torch.randint(0, 50, (1, 10)),), tmp_path / "hf.onnx")
    assert result.inputs == ["input_ids"] and result.outputs == ["logits"]
    assert len(result.ternary_layers) == 14 and [layer.name for layer in result.float_layers] == ["lm_head"]
    assert result.ternary_layers[0].name == "model.layers.0.self_attn.q_proj"  # the HF module path
    sess = session(result.path)
    for shape in ((1, 10), (3, 17)):
        tokens = torch.randint(0, 50, shape)
        with torch.no_grad():
            want = model(tokens).logits.numpy()
        assert rel_err(run(sess, tokens), want) < LLAMA_TOL
    prompt = torch.randint(0, 50, (1, 4))
    expected = greedy_generate(lambda t: model(t, use_cache=False).logits, prompt, 6)
    tokens = prompt
    for _ in range(6):
        tokens = torch.cat([tokens, torch.from_numpy(run(sess, tokens)[:, -1].argmax(-1, keepdims=True))], dim=1)
    assert torch.equal(tokens, expected)


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_paths_formats_and_opsets(tmp_path):
    model = bitcompile.pack(MLP(32, [32], 4), bitcompile.TernaryConfig(**REF))
    x = torch.randn(2, 32)
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, x, existing)
    with pytest.raises(OnnxExportError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(OnnxExportError, match="is a directory"):
        export_onnx(model, x, tmp_path)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="permission denied"):
            export_onnx(model, x, locked / "m.onnx")
    with pytest.raises(ValueError, match="format='int4' is invalid"):
        export_onnx(model, x, tmp_path / "m.onnx", format="int4")
    with pytest.raises(ValueError, match="needs opset 25"):
        export_onnx(model, x, tmp_path / "m.onnx", format="qdq", opset=21)
    with pytest.raises(OnnxExportError, match="config= is for unpacked models"):
        export_onnx(model, x, tmp_path / "m.onnx", config=bitcompile.TernaryConfig())
    with pytest.raises(OnnxExportError, match="no nn.Linear"):
        export_onnx(nn.Sequential(nn.ReLU()), x, tmp_path / "m.onnx")
    with pytest.raises(OnnxExportError, match=r"input dtype BFLOAT16 is not supported.*model.float\(\)"):
        bf16 = bitcompile.pack(MLP(32, [32], 4).to(torch.bfloat16), bitcompile.TernaryConfig(**REF))
        export_onnx(bf16, x.to(torch.bfloat16), tmp_path / "m.onnx")
    assert existing.read_bytes() == b"x" and not (tmp_path / "m.onnx").exists()


@torch.library.custom_op("bctest::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _Mystery(nn.Module):
    def forward(self, x):
        return torch.ops.bctest.mystery(x)


def test_untranslatable_op_is_reported_with_node_and_layer(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), _Mystery())
    with pytest.raises(OnnxExportError, match=r"at node 'mystery' \(bctest.mystery.default\) in layer '1'.*No ONNX function"):
        export_onnx(model, torch.randn(2, 32), tmp_path / "m.onnx", config=bitcompile.TernaryConfig(**REF))


def test_cli_export_prints_the_summary(tmp_path, capsys):
    from bitcompile.cli import main

    module = tmp_path / "mlp_factory.py"
    module.write_text(
        "import torch\nfrom bitcompile.models import MLP\n"
        "def build():\n    return MLP(64, [64], 8), (torch.randn(2, 64),)\n"
    )
    out = tmp_path / "cli.onnx"
    code = main(["export", f"{module}:build", "-o", str(out), "--format", "qdq", "--option", "target=reference"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "ternary layers: 2" in text and "float layers: 0" in text and "full_check=True): passed" in text
    assert "onnxruntime fusion: 2/2 ternary layers run as MatMulNBits" in text
    assert main(["export", f"{module}:build", "-o", str(out)]) == 2  # exists, no --overwrite: checked before loading
    assert "--overwrite" in capsys.readouterr().err


def test_mismatched_example_inputs_fail_in_one_line_without_torch_export_logs(tmp_path, log_records):
    """Issue 15 item 17: torch.export logged "always_classified is unsupported." (twice) before the error."""
    import logging

    with log_records("torch.export._trace") as records:
        with pytest.raises(OnnxExportError, match="input's last dim 8 != in_features 16"):  # a packed model
            export_onnx(
                bitcompile.pack(MLP(16, [32], 4), bitcompile.TernaryConfig(**REF)), (torch.randn(2, 8),), tmp_path / "m.onnx"
            )
        # an unpacked one is packed with the example inputs (issue 16): the model's own error, in one line
        with pytest.raises(OnnxExportError, match=r"^export_onnx: the model fails on its example inputs: RuntimeError: mat1 and mat2 shapes cannot be multiplied \(2x8 and 16x32\)$"):
            export_onnx(MLP(16, [32], 4), (torch.randn(2, 8),), tmp_path / "m.onnx", config=bitcompile.TernaryConfig(**REF))
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


class _FourAxes(nn.Module):
    """A linear over the last axis of a (batch, seq, frames, features) float input."""

    def __init__(self, frames_fixed: bool = False):
        super().__init__()
        self.frames_fixed = frames_fixed
        # flattening (frames, features) into a Linear(3 * 64) fixes the frames axis to 3
        self.fc = nn.Linear(3 * 64 if frames_fixed else 64, 32)

    def forward(self, x):
        return self.fc(x.flatten(2) if self.frames_fixed else x)


def test_auto_dynamic_shapes_make_every_axis_but_the_last_of_a_float_input_dynamic(tmp_path):
    """Issue 15 item 17: "auto" made only axes 0-1 dynamic; the docs say every axis but the last."""
    torch.manual_seed(0)
    config = bitcompile.TernaryConfig(**REF)
    model = _FourAxes().eval()
    result = export_onnx(model, (torch.randn(2, 3, 4, 64),), tmp_path / "four.onnx", config=config)
    sess = session(result.path)
    dims = sess.get_inputs()[0].shape
    assert dims[:2] == ["batch", "seq"] and isinstance(dims[2], str) and dims[3] == 64, dims
    packed = bitcompile.pack(copy.deepcopy(model), config)
    for shape in [(2, 3, 4, 64), (1, 5, 7, 64), (3, 2, 1, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(run(sess, x), packed(x).numpy()) < MLP_TOL

    # An axis past batch and sequence that the model fixes (Dim.DYNAMIC would fail the export) still exports.
    model = _FourAxes(frames_fixed=True).eval()
    fixed = export_onnx(model, (torch.randn(2, 3, 3, 64),), tmp_path / "f.onnx", config=config)
    sess = session(fixed.path)
    assert sess.get_inputs()[0].shape[:2] == ["batch", "seq"]
    packed = bitcompile.pack(copy.deepcopy(model), config)
    x = torch.randn(4, 1, 3, 64)
    with torch.no_grad():
        assert rel_err(run(sess, x), packed(x).numpy()) < MLP_TOL
