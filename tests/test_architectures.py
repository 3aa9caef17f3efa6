"""Beyond decoder-only LMs (issue 16): packed layers keep the nn.Linear surface model code reads
(T5 packs and runs), and export_onnx takes a model's main input and first output (BERT, ViT, an
audio encoder) or refuses an encoder-decoder model in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.export.prepare import MainInputFirstOutput
from bitcompile.export.results import OnnxExportError
from bitcompile.runtime.layers import PackedWeightInfo
from reference_impl import swap_linears_for_fake_quant

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


def _t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def test_packed_weight_has_shape_dtype_device_and_no_values():
    layer = bitcompile.pack(nn.Sequential(nn.Linear(64, 32))).get_submodule("0")
    weight = layer.weight
    assert isinstance(weight, PackedWeightInfo) and not isinstance(weight, torch.Tensor)
    assert (weight.shape, weight.dtype, weight.device) == (torch.Size([32, 64]), torch.float32, torch.device("cpu"))
    assert weight.size(1) == 64 and weight.dim() == 2 and weight.numel() == 2048 and not weight.requires_grad
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.half().weight.dtype == torch.float16  # follows the float layer it stands in for
    with pytest.raises(AttributeError, match="dequantized_weight"):
        weight.data  # noqa: B018


def test_t5_packs_and_runs_like_its_fake_quant_reference():
    model = _t5()
    ids, decoder_ids = torch.randint(2, 96, (2, 7)), torch.randint(2, 96, (2, 5))
    reference = swap_linears_for_fake_quant(_t5(), skip=("lm_head",))  # independent: tests/reference_impl.py
    packed = bitcompile.pack(model)
    assert isinstance(packed.encoder.block[0].layer[1].DenseReluDense.wo, bitcompile.PackedTernaryLinear)
    with torch.no_grad():
        got = packed(input_ids=ids, decoder_input_ids=decoder_ids).logits
        want = reference(input_ids=ids, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    generated = packed.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 4)


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _bert():
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
    )  # fmt: skip
    return transformers.BertModel(config), torch.randint(0, 96, (2, 8)), "input_ids", "last_hidden_state"


def _vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config), torch.randn(2, 3, 16, 16), "pixel_values", "logits"


def _whisper_config():
    return transformers.WhisperConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip


def _whisper_encoder():
    encoder = transformers.WhisperForConditionalGeneration(_whisper_config()).get_encoder()
    return encoder, torch.randn(2, 8, 32), "input_features", "last_hidden_state"


@pytest.mark.parametrize("build", [_bert, _vit, _whisper_encoder], ids=["bert", "vit", "whisper-encoder"])
def test_encoders_export_main_input_to_first_output_with_ort_parity(build, tmp_path):
    torch.manual_seed(0)
    model, x, input_name, output_name = build()
    model.eval()
    result = bitcompile.export_onnx(model, (x,), tmp_path / "m.onnx")
    assert result.inputs == [input_name] and result.outputs == [output_name]
    assert sum(layer.kind != "float" for layer in result.layers) >= 4  # q, k, v, o, ... are 2-bit
    packed = bitcompile.pack(model, example_inputs=(x,))
    with torch.no_grad():
        want = MainInputFirstOutput(packed)(x).numpy()
    got = _ort_run(tmp_path / "m.onnx", x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    batch3 = torch.cat([x, x[:1]])  # the batch axis stays dynamic
    assert _ort_run(tmp_path / "m.onnx", batch3).shape[0] == 3


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_encoder_decoder_models_are_refused_in_one_line(name, tmp_path):
    if name == "t5":
        model, x = _t5(), torch.randint(2, 96, (1, 6))
    else:
        model, x = transformers.WhisperForConditionalGeneration(_whisper_config()).eval(), torch.randn(1, 8, 32)
    with pytest.raises(OnnxExportError) as error:
        bitcompile.export_onnx(model, (x,), tmp_path / "m.onnx")
    message = str(error.value)
    assert "\n" not in message and "encoder-decoder" in message and type(model).__name__ in message
    assert "get_encoder()" in message and "decoder-only" in message
    assert not (tmp_path / "m.onnx").exists()


class CalledTwice(nn.Module):
    """``shared`` runs twice in one forward: the compiler keeps it float (its two calls must agree)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.relu(self.shared(x))))


def test_export_of_an_unpacked_model_keeps_float_what_the_compiler_keeps_float(tmp_path):
    torch.manual_seed(0)
    model = CalledTwice().eval()
    x = torch.randn(4, 32)
    decisions = {d.name: d for d in bitcompile.explain(model, x, inner="aot_eager").layers}
    assert not decisions["shared"].rewritten  # the compiler's view (what training saw)
    result = bitcompile.export_onnx(model, (x,), tmp_path / "m.onnx")
    kinds = {layer.name: layer.kind for layer in result.layers}
    assert kinds["shared"] == "float" and kinds["out"] != "float"
    # the exported numbers are the compiler's model: float `shared`, ternary `out`
    reference = swap_linears_for_fake_quant(copy.deepcopy(model), skip=("shared",))
    with torch.no_grad():
        want = reference(x).numpy()
    got = _ort_run(tmp_path / "m.onnx", x)
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert isinstance(model.shared, nn.Linear) and type(model.out) is nn.Linear  # the user's model is untouched
