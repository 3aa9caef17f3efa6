"""Property-based tests of load_packed: random mutations of a valid checkpoint's metadata and
tensors. Whatever the file holds, load_packed either loads exactly what it holds (every stored
tensor bit for bit, every layer as its metadata describes it) or raises one CheckpointError
line, and a failed load leaves the target model exactly as it was.

Examples per run (derandomized, so CI runs the same ones): metadata 150, tensors 150, 300 in all.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bitcompile
from bitcompile import CheckpointError, PackedTernaryLinear, TernaryConfig
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig
from bitcompile.runtime.int8_head import Int8Embedding, Int8Linear

METADATA_EXAMPLES = 150
TENSOR_EXAMPLES = 150
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _llama():
    torch.manual_seed(0)
    config = TinyLlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2)
    return TinyLlama(config).eval()


def _mlp():
    torch.manual_seed(0)
    return MLP(40, [24], 6)


@dataclass
class Base:
    """A valid checkpoint (metadata, tensors) and the factory of the model it loads into."""

    factory: object
    metadata: dict
    tensors: dict
    pristine: tuple  # the factory's model before any load: module types and state


def _snapshot(model: nn.Module) -> tuple:
    return [(name, type(m)) for name, m in model.named_modules()], copy.deepcopy(model.state_dict())


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = []
    # groups of 16 with an int8 head tied to an int8 embedding (format 2); per-row with biases (format 1)
    for factory, config, head in ((_llama, TernaryConfig(group_size=16), "int8"), (_mlp, TernaryConfig(), "float")):
        path = bitcompile.save_packed(bitcompile.pack(factory(), config, head=head), tmp_path_factory.mktemp("base"))
        with safe_open(str(path), framework="pt") as handle:
            metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
        out.append(Base(factory, metadata, tensors, _snapshot(factory())))
    return out


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzed")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _check_load(base: Base, directory, metadata: dict, tensors: dict, record=event) -> None:
    """The property: an exact load or one CheckpointError line with the model untouched."""
    save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
    model = base.factory()
    try:
        loaded = bitcompile.load_packed(directory, model)
    except CheckpointError as error:
        record(f"refused: {str(error)[:50]}")  # --hypothesis-show-statistics lists what was refused
        assert "\n" not in str(error) and len(str(error)) < 400, str(error)
        modules, state = base.pristine
        assert [(name, type(m)) for name, m in model.named_modules()] == modules
        assert model.state_dict().keys() == state.keys()
        assert all(_bits_equal(v, state[k]) for k, v in model.state_dict().items())
        return
    record("loaded")
    assert loaded is model
    state = loaded.state_dict()
    for name, tensor in tensors.items():
        assert name in state and _bits_equal(state[name], tensor), name
    for name, value in state.items():  # what the file does not store is tied to what it does
        if name not in tensors:
            assert any(_bits_equal(value, tensors[k]) for k in tensors), name
    for name, info in json.loads(metadata["layers"]).items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, PackedTernaryLinear)
        assert (layer.in_features, layer.out_features, layer.bias is not None) == (info["in_features"], info["out_features"], info["bias"])
        assert (layer.group_size.option, layer.activations) == (info["group_size"], info["activations"])
    for name, info in json.loads(metadata.get("int8_layers", "{}")).items():
        assert isinstance(loaded.get_submodule(name), Int8Embedding if info["kind"] == "embedding" else Int8Linear)


# --- metadata -----------------------------------------------------------------------------------

NAMES = st.sampled_from(["", ".", "out", "hidden", "hidden.0", "hidden.0.x", "layers.0", "__class__", "../out",
                         "_orig_mod.out", "lm_head", "embed_tokens", "layers.0.mlp.up_proj"]) | st.text(max_size=6)  # fmt: skip
SPECIAL = st.sampled_from([0, -1, 1, 2, 16, 24, 32, 48, 2**31, 10**9, 10**7, 10**30, -(2**63), 1.0, 24.0, float("nan"),
                           float("inf"), True, False, None, "", "tensor", "int8", "float32", "bfloat16", "int32",
                           "embedding", "linear", "Tensor", "__class__"])  # fmt: skip
SCALARS = SPECIAL | st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
#: Other valid values of a layer's fields: a checkpoint changed to one of them may still load.
VALID = {"group_size": [-1, "tensor", 16, 10**9], "activations": ["int8", None], "bias": [True, False],
         "original_dtype": ["float32", "bfloat16", "float16"], "padding_idx": [None, 0, 3], "tied_to": [None]}  # fmt: skip
RAW_TEXT = (
    st.text(max_size=20)
    | st.integers(1, 200_000).map(lambda depth: "[" * depth + "]" * depth)
    | st.integers(1, 200_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth)
    | st.sampled_from(["{}", "[]", "null", "1", '"x"', "NaN", "{", "1" * 5000])
)


def _mutate_layer_table(data, table: dict) -> dict:
    """One random change to a ``layers`` / ``int8_layers`` table: an entry, a field or a name."""
    if not table or data.draw(st.integers(0, 9)) == 0:
        return data.draw(st.dictionaries(NAMES, JSON, max_size=2))
    name = data.draw(st.sampled_from(sorted(table)))
    entry = table[name]
    op = data.draw(st.sampled_from(["drop", "rename", "replace", "field", "field", "field", "del_field", "add_field", "copy"]))
    if op == "drop":
        table.pop(name)
    elif op == "rename":
        table[data.draw(NAMES)] = table.pop(name)
    elif op == "replace":
        table[name] = data.draw(JSON)
    elif op == "copy":
        table[data.draw(NAMES)] = copy.deepcopy(entry)
    elif isinstance(entry, dict) and entry:
        key = data.draw(st.sampled_from(sorted(entry)))
        if op == "del_field":
            entry.pop(key)
        elif op == "add_field":
            entry[data.draw(st.text(max_size=6))] = data.draw(JSON)
        else:
            old = entry[key]
            nearby = [old + 1, old - 1, old * 2, 0] if type(old) is int else [old]
            entry[key] = data.draw(st.sampled_from(nearby + VALID.get(key, [])) | JSON)
    return table


@settings(FUZZ, max_examples=METADATA_EXAMPLES)
@given(data=st.data())
def test_fuzzed_metadata_loads_exactly_or_raises_one_checkpoint_error(bases, checkpoint_dir, data):
    base = data.draw(st.sampled_from(bases))
    metadata = dict(base.metadata)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["table"] * 6 + ["json", "raw", "raw", "delete", "version"]))
        if op == "version":  # both versions are read
            metadata["format_version"] = data.draw(st.sampled_from(["1", "2"]))
            continue
        if op == "table":  # mostly the layer tables: the header fields are compared as whole strings
            key = data.draw(st.sampled_from(["layers", "layers", "int8_layers"]))
        else:
            key = data.draw(st.sampled_from(sorted(metadata)) | st.sampled_from(["layers", "int8_layers"]))
        if op == "delete":
            metadata.pop(key, None)
        elif op == "raw":
            metadata[key] = data.draw(RAW_TEXT)
        elif op == "json":
            metadata[key] = json.dumps(data.draw(JSON))
        else:
            try:
                table = json.loads(metadata.get(key, "{}"))
            except (ValueError, RecursionError):
                table = {}
            table = table if isinstance(table, dict) else {}
            metadata[key] = json.dumps(_mutate_layer_table(data, table))
    _check_load(base, checkpoint_dir, metadata, dict(base.tensors))


# --- tensors ------------------------------------------------------------------------------------

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32, torch.bool])
BAD_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 3.0e38]) | st.floats(width=32)


def _mutate_tensor(data, tensors: dict) -> None:
    name = data.draw(st.sampled_from(sorted(tensors)))
    tensor = tensors[name].clone()
    op = data.draw(st.sampled_from(["dtype", "shape", "value", "value", "value", "drop", "extra", "rename"]))
    if op == "dtype":
        tensors[name] = tensor.to(data.draw(DTYPES))
    elif op == "shape":
        tensor = tensor.reshape(-1) if tensor.dim() == 0 else tensor  # an earlier draw may have made it a scalar
        shapes = [tensor.reshape(-1), tensor[:1], tensor[1:], torch.cat([tensor, tensor[:1]]), tensor.reshape(1, -1),
                  tensor.sum().reshape(()).to(tensor.dtype)]  # fmt: skip
        if tensor.dim() == 2:
            shapes += [tensor.t().contiguous(), tensor[:, :-1].contiguous(), torch.cat([tensor, tensor[:, :1]], dim=1)]
        tensors[name] = data.draw(st.sampled_from(shapes))
    elif op == "value" and tensor.numel():
        flat = tensor.reshape(-1)
        index = data.draw(st.integers(0, flat.numel() - 1))
        if tensor.is_floating_point():
            flat[index] = data.draw(BAD_FLOATS)
        elif tensor.dtype == torch.uint8:
            flat[index] = data.draw(st.integers(0, 255))  # packed 2-bit codes: 3 may appear in any of 4 fields
        else:
            flat[index] = data.draw(st.integers(-128, 127))  # int8 codes: -128 is out of range
        tensors[name] = tensor
    elif op == "drop":
        tensors.pop(name)
    elif op == "extra":
        other = data.draw(st.sampled_from(sorted(tensors)))
        extra = data.draw(st.sampled_from(["extra", "out.weight", "lm_head.codes", "lm_head.scales", "embed_tokens.codes",
                                           "embed_tokens.weight", "hidden.0.weight", f"{name}.x", "__class__"]))  # fmt: skip
        tensors[extra] = tensors[other].clone() if data.draw(st.booleans()) else tensor
    elif op == "rename":
        tensors[data.draw(st.sampled_from(["x", f"{name}_", name.replace(".", "_"), f"_orig_mod.{name}"]))] = tensors.pop(name)


@settings(FUZZ, max_examples=TENSOR_EXAMPLES)
@given(data=st.data())
def test_fuzzed_tensors_load_exactly_or_raise_one_checkpoint_error(bases, checkpoint_dir, data):
    base = data.draw(st.sampled_from(bases))
    tensors = dict(base.tensors)
    for _ in range(data.draw(st.integers(1, 3))):
        if tensors:
            _mutate_tensor(data, tensors)
    _check_load(base, checkpoint_dir, dict(base.metadata), tensors)


def test_unmutated_bases_load_equal_to_the_saved_models(bases, checkpoint_dir):
    for base in bases:
        _check_load(base, checkpoint_dir, dict(base.metadata), dict(base.tensors), record=lambda outcome: None)
        loaded = bitcompile.load_packed(checkpoint_dir, base.factory())
        assert loaded.state_dict().keys() >= base.tensors.keys()
