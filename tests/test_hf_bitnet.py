"""Hugging Face BitNet checkpoints: read losslessly by pack(folder), written by export_hf_bitnet (issue 17)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
bitnet = pytest.importorskip("transformers.integrations.bitnet", reason="this transformers has no BitNet integration")

import bitcompile  # noqa: E402
from bitcompile.export.hf_bitnet import HfBitnetExportError, export_hf_bitnet, inverse_scale  # noqa: E402
from bitcompile.runtime.hf_bitnet import pack_bitnet_weight, unpack_bitnet_weight  # noqa: E402
from bitcompile.runtime.hf_folder import ModelLoadError  # noqa: E402


def tiny_llama(group_size="tensor", seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return bitcompile.pack(transformers.LlamaForCausalLM(config).eval(), {"group_size": group_size})


def packed_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bitcompile.PackedTernaryLinear)}


@pytest.mark.parametrize("rows", [4, 12, 64])
def test_bitnet_packing_matches_transformers(rows):
    codes = torch.randint(-1, 2, (rows, 9), dtype=torch.int8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(pack_bitnet_weight(codes), bitnet.pack_weights(codes.clone()))  # it adds 1 in place
    packed = bitnet.pack_weights(codes.clone())
    assert torch.equal(unpack_bitnet_weight(packed, rows), codes)
    assert torch.equal(bitnet.unpack_weights(pack_bitnet_weight(codes), torch.float32), codes.float())


def test_inverse_scale_gives_back_the_scale_within_one_ulp():
    scales = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 3 + 1e-4
    back = torch.cat([1.0 / inverse_scale(float(s)) for s in scales])
    ulp = torch.finfo(torch.float32).eps * scales  # fp32 spacing is <= eps * |s|
    assert bool(((back - scales).abs() <= ulp).all())
    exact = int((back == scales).sum())
    assert exact > 400  # measured 88 %: for the rest no fp32 w has 1 / w == s


def test_hf_bitnet_round_trip_through_transformers(tmp_path):
    model = tiny_llama()
    export_hf_bitnet(model, tmp_path / "bn")
    config = json.loads((tmp_path / "bn" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bn")).eval()
    assert isinstance(hf.model.layers[0].mlp.down_proj, bitnet.BitLinear)
    for name, layer in packed_layers(model).items():  # transformers' own unpacking gives our codes
        theirs = hf.get_submodule(name)
        assert torch.equal(bitnet.unpack_weights(theirs.weight, torch.float32), layer.codes().float()), name
        assert torch.allclose(1.0 / theirs.weight_scale.float(), layer.scales[:1, 0], rtol=1.2e-7, atol=0), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # BitLinear's @torch.compile helpers, eagerly
        theirs, ours = hf(ids).logits, model(ids).logits
    # BitLinear rounds x * (127 / max|x|), bitcompile x / (max|x| / 127): an element on a
    # half-step can land one int8 step apart (1/127 of max|x|) and the division by
    # s_in * weight_scale rounds differently from bitcompile's two products. Measured 6e-4 of 1.4.
    assert torch.allclose(theirs, ours, atol=5e-3 * ours.abs().max().item(), rtol=0)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_pack_reads_hf_bitnet_losslessly(tmp_path):
    model = tiny_llama()
    export_hf_bitnet(model, tmp_path / "bn")
    imported = bitcompile.pack(tmp_path / "bn")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "bn" / "model.safetensors"))
    ours, theirs = packed_layers(model), packed_layers(imported)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():
        assert torch.equal(theirs[name].packed, layer.packed), name  # identical codes
        assert torch.equal(theirs[name].scales[:, 0], (1.0 / stored[f"{name}.weight_scale"]).expand(layer.out_features)), name
        # s -> weight_scale -> 1 / weight_scale: bit-exact for most s, else one fp32 ulp
        assert torch.allclose(theirs[name].scales, layer.scales, rtol=1.2e-7, atol=0), name
        assert theirs[name].group_code == 0  # per tensor, as HF BitNet stores it
    assert {d.source for d in imported.bitcompile_pack_plan if d.packed} == {"HF BitNet (lossless)"}
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(imported(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_hf_bitnet_export_refuses_per_row_scales_unless_lossy(tmp_path):
    model = tiny_llama(group_size=-1)
    with pytest.raises(HfBitnetExportError, match=r"layer 'model.layers.0.self_attn.q_proj' has per-row scales; HF BitNet"):
        export_hf_bitnet(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_hf_bitnet(model, tmp_path / "lossy", lossy_scales=True)
    assert any("14 layers written with one mean scale" in str(w.message) for w in caught)
    imported = bitcompile.pack(tmp_path / "lossy")
    for name, layer in packed_layers(model).items():  # codes kept, scales replaced by one value
        assert torch.equal(packed_layers(imported)[name].codes(), layer.codes()), name


def test_hf_bitnet_refuses_what_it_cannot_read_or_write(tmp_path):
    with pytest.raises(HfBitnetExportError, match="no PackedTernaryLinear layer"):
        export_hf_bitnet(transformers.LlamaForCausalLM(tiny_llama().config), tmp_path / "u")
    weight_only = bitcompile.pack(
        transformers.LlamaForCausalLM(tiny_llama().config), {"group_size": "tensor", "activations": None}
    )
    with pytest.raises(HfBitnetExportError, match="is weight-only; HF BitLinear always quantizes activations"):
        export_hf_bitnet(weight_only, tmp_path / "w")
    export_hf_bitnet(tiny_llama(), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["quantization_config"]["linear_class"] = "autobitlinear"
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="linear_class='autobitlinear'; bitcompile reads 'bitlinear'"):
        bitcompile.pack(tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf_bitnet(tiny_llama(), tmp_path / "a")
