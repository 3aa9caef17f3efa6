"""The 1.6-bit layout (kernels/packing_base3.py, csrc/bc_t5.c) and pack(layout="1.6bit").

The reference pack / unpack here are written from the layout's formula (byte = 128 * (V < 0)
+ |V|, V = sum_i q_i 3^i, byte j of block b holding k = 320 b + 64 i + j), by enumerating the
243 digit patterns, not by the module's division. The kernels must give the 2-bit kernels'
outputs bit for bit (same activation quantizer, same integer sums, same roundings).
"""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.config import BitcompileWarning
from bitcompile.kernels import cpu, packing, packing_base3, reference
from bitcompile.kernels.cpu import gemm
from bitcompile.kernels.cpu.base3 import packed_linear_base3
from bitcompile.runtime.checkpoint import CheckpointError
from bitcompile.runtime.layers import PackedTernaryLinear
from bitcompile.runtime.module_tree import weight_nbytes

needs_c = pytest.mark.skipif(not cpu.available(), reason=f"C kernels not built: {cpu.unavailable_reason()}")

# byte -> its five digits, from the formula (every pattern of five ternary digits)
_DIGITS_OF_BYTE = {}
for _pattern in itertools.product((-1, 0, 1), repeat=5):
    _v = sum(q * 3**i for i, q in enumerate(_pattern))
    _DIGITS_OF_BYTE[128 * (_v < 0) + abs(_v)] = _pattern


def reference_pack(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    kp = -(-k // 320) * 320
    value = torch.zeros((n, kp // 5), dtype=torch.int64)
    ks = torch.arange(k)
    column = 64 * (ks // 320) + ks % 64  # the byte of weight k
    weight = 3 ** ((ks % 320) // 64)  # 3^i, i = plane
    value.index_add_(1, column, q.long() * weight)
    return torch.where(value < 0, 128 - value, value).to(torch.uint8)


def reference_unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    n = packed.shape[0]
    q = torch.zeros((n, k), dtype=torch.int8)
    for kk in range(k):
        b, i, j = kk // 320, (kk % 320) // 64, kk % 64
        for row in range(n):
            q[row, kk] = _DIGITS_OF_BYTE[int(packed[row, 64 * b + j])][i]
    return q


KS = [1, 5, 63, 64, 65, 319, 320, 321, 576, 577, 641, 1000]


@pytest.mark.parametrize("k", KS)
def test_pack_matches_the_formula_and_round_trips(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-1, 2, (3, k), generator=g, dtype=torch.int8)
    packed = packing_base3.pack_codes(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packing_base3.packed_shape(3, k)
    assert torch.equal(packed, reference_pack(q))
    assert torch.equal(reference_unpack(packed, k), q)
    assert torch.equal(packing_base3.unpack_codes(packed, k), q)


def test_every_byte_pattern_decodes():
    patterns = torch.tensor(list(itertools.product((-1, 0, 1), repeat=5)), dtype=torch.int8)  # 243 x 5
    q = torch.zeros((243, 320), dtype=torch.int8)
    for i in range(5):
        q[:, 64 * i + 7] = patterns[:, i]
    packed = packing_base3.pack_codes(q)
    assert len(set(packed[:, 7].tolist())) == 243 and not packing_base3.invalid_bytes(packed).any()
    assert torch.equal(packing_base3.unpack_codes(packed, 320), q)
    assert packing_base3.packed_shape(4096, 4096) == (4096, 832)  # 1.625 bits per weight at K = 4096


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match=r"ternary in \{-1, 0, 1\} \(found 2\)"):
        packing_base3.pack_codes(torch.tensor([[0, 2]], dtype=torch.int8))
    with pytest.raises(TypeError, match="integer tensor"):
        packing_base3.pack_codes(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must be 2-D"):
        packing_base3.pack_codes(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="needs 64"):
        packing_base3.unpack_codes(torch.zeros((2, 65), dtype=torch.uint8), 300)
    for bad in (122, 128, 255):
        packed = torch.zeros((1, 64), dtype=torch.uint8)
        packed[0, 3] = bad
        with pytest.raises(ValueError, match=f"byte {bad} is not a code"):
            packing_base3.unpack_codes(packed, 320)
    with pytest.raises(TypeError, match="2-D uint8"):
        packing_base3.unpack_codes(torch.zeros((1, 64), dtype=torch.int8), 320)


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request, monkeypatch):
    if not cpu.isa_supported(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("BITCOMPILE_ISA", request.param)
    return request.param


SHAPES = [(1, 1, 1), (1, 13, 100), (2, 7, 320), (1, 5, 321), (3, 9, 577), (1, 37, 1000), (5, 4, 641), (9, 6, 255),
          (17, 11, 700), (1, 9, 4096)]  # fmt: skip


@needs_c
@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("group", [-1, 0])
def test_int8_kernel_equals_the_2bit_kernel_and_reference(isa, m, n, k, group):
    g = torch.Generator().manual_seed(m * 1000 + k)
    q, s = reference.quantize_weight(torch.randn(n, k, generator=g), group)
    x, bias = torch.randn(m, k, generator=g) * 3, torch.randn(n, generator=g)
    for b in (None, bias):
        want = gemm.packed_linear(x, packing.pack_codes(q), s, k, group, b, True, torch.float32)
        got = packed_linear_base3(x, packing_base3.pack_codes(q), s, k, group, b, True, torch.float32)
        assert torch.equal(got, want)
        assert torch.equal(got, reference.packed_linear(x, packing.pack_codes(q), s, k, group, b, True, torch.float32))
        prepared = cpu.PreparedPackedLinear(packing_base3.pack_codes(q), s.float().contiguous(), k, group, b, layout="1.6bit")
        assert torch.equal(prepared(x), want)
        xb = x.bfloat16()
        want16 = gemm.packed_linear(xb, packing.pack_codes(q), s, k, group, b, True, torch.bfloat16)
        assert torch.equal(prepared(xb), want16)


@needs_c
@pytest.mark.parametrize("m, n, k", [(1, 13, 100), (3, 9, 577), (2, 5, 1000)])
@pytest.mark.parametrize("group, activations", [(64, True), (100, True), (-1, False), (32, False)])
def test_groups_and_weight_only_equal_the_portable_2bit_kernel(monkeypatch, m, n, k, group, activations):
    monkeypatch.setenv("BITCOMPILE_ISA", "scalar")  # the same summation order (the SIMD 2-bit one differs in rounding)
    g = torch.Generator().manual_seed(k)
    q, s = reference.quantize_weight(torch.randn(n, k, generator=g), group)
    x = torch.randn(m, k, generator=g)
    want = gemm.packed_linear(x, packing.pack_codes(q), s, k, group, None, activations, torch.float32)
    got = packed_linear_base3(x, packing_base3.pack_codes(q), s, k, group, None, activations, torch.float32)
    assert torch.equal(got, want)
    ref = reference.packed_linear(x, packing.pack_codes(q), s, k, group, None, activations, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_c
def test_kernel_arguments_are_checked():
    q, s = reference.quantize_weight(torch.randn(4, 100), -1)
    packed = packing_base3.pack_codes(q)
    with pytest.raises(ValueError, match="packed has 32 bytes per row, in_features=100 needs 64"):
        packed_linear_base3(torch.randn(1, 100), packing.pack_codes(q), s, 100, -1, None, True, torch.float32)
    with pytest.raises(ValueError, match=r"activations must be 2-D \(M, 100\)"):
        packed_linear_base3(torch.randn(1, 99), packed, s, 100, -1, None, True, torch.float32)
    with pytest.raises(ValueError, match=r"w_scales must have shape \(4, 1\)"):
        packed_linear_base3(torch.randn(1, 100), packed, s[:3], 100, -1, None, True, torch.float32)
    with pytest.raises(ValueError, match="layout='1bit' is not one of"):
        cpu.PreparedPackedLinear(packed, s.float().contiguous(), 100, -1, None, layout="1bit")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(577, 96), nn.ReLU(), nn.Linear(96, 33, bias=False))


def test_pack_layout_choice_outputs_plan_and_memory():
    x = torch.randn(4, 577)
    two, base3 = bitcompile.pack(_mlp()), bitcompile.pack(_mlp(), layout="1.6bit")
    assert all(m.layout == "1.6bit" for m in base3.modules() if isinstance(m, PackedTernaryLinear))
    assert "layout=1.6bit" in repr(base3) and "layout=" not in repr(two)
    with torch.no_grad():
        assert torch.equal(base3(x), two(x))
        assert torch.equal(base3(x.bfloat16()), two(x.bfloat16()))
    plan = {d.name: d for d in base3.bitcompile_pack_plan}
    assert (plan["0"].layout, plan["0"].packed_bytes) == ("1.6bit", 96 * 640 // 5)
    assert {d.name: d.layout for d in two.bitcompile_pack_plan} == {"0": "2bit", "2": "2bit"}
    saved = sum(a.packed.nbytes - b.packed.nbytes for a, b in zip(two.modules(), base3.modules()) if isinstance(a, PackedTernaryLinear))
    assert saved > 0 and weight_nbytes(two) - weight_nbytes(base3) == saved
    with pytest.raises(ValueError, match="pack: layout='1bit' is not one of '2bit', '1.6bit'"):
        bitcompile.pack(_mlp(), layout="1bit")


def test_gradients_and_compiled_graphs_match_the_2bit_layers(monkeypatch):
    x = torch.randn(3, 577)
    two, base3 = bitcompile.pack(_mlp()), bitcompile.pack(_mlp(), layout="1.6bit")
    grads = []
    for model in (two, base3):
        xg = x.clone().requires_grad_()
        model(xg).square().sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])
    compiled = torch.compile(base3, backend="bitcpm", options={"inner": "aot_eager"})
    import bitcompile.runtime.layers as layers_module

    monkeypatch.setattr(layers_module, "_warned_compiled_base3", False)
    with torch.no_grad(), pytest.warns(BitcompileWarning, match="repacked to 2 bits on every call") as caught:
        assert torch.equal(compiled(x), two(x))
    assert sum("repacked to 2 bits" in str(w.message) for w in caught) == 1  # said once, not per layer


def test_save_load_round_trip_records_the_layout(tmp_path):
    from safetensors import safe_open

    model = bitcompile.pack(_mlp(), layout="1.6bit")
    bitcompile.save_packed(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format_version"] == "3"
    assert json.loads(metadata["layers"])["0"]["layout"] == f"{packing_base3.LAYOUT_NAME} v{packing_base3.LAYOUT_VERSION}"
    loaded = bitcompile.load_packed(tmp_path, _mlp)
    assert loaded[0].layout == "1.6bit" and torch.equal(loaded[0].packed, model[0].packed)
    x = torch.randn(2, 577)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a 2-bit model still writes format 1 with no layout key
    bitcompile.save_packed(bitcompile.pack(_mlp()), tmp_path / "two")
    with safe_open(str(tmp_path / "two" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1" and "layout" not in json.loads(handle.metadata()["layers"])["0"]


def test_checkpoint_refuses_bad_1p6bit_bytes_and_layout_names(tmp_path):
    from safetensors.torch import load_file, save_file

    model = bitcompile.pack(_mlp(), layout="1.6bit")
    bitcompile.save_packed(model, tmp_path)
    path = tmp_path / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    bad = dict(tensors)
    bad["0.packed"] = tensors["0.packed"].clone()
    bad["0.packed"][5, 7] = 123
    save_file(bad, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"tensor '0.packed' holds a byte that is no 1.6-bit code \(row 5"):
        bitcompile.load_packed(tmp_path, _mlp)
    layers = json.loads(metadata["layers"])
    layers["0"]["layout"] = "bc_t5 v9"
    save_file(tensors, str(path), metadata={**metadata, "layers": json.dumps(layers)})
    with pytest.raises(CheckpointError, match="layer '0': metadata layout='bc_t5 v9' is invalid"):
        bitcompile.load_packed(tmp_path, _mlp)
    layers["0"]["layout"] = f"{packing_base3.LAYOUT_NAME} v{packing_base3.LAYOUT_VERSION}"
    save_file(tensors, str(path), metadata={**metadata, "layers": json.dumps(layers), "format_version": "2"})
    with pytest.raises(CheckpointError, match="unknown key"):  # format 2 has no per-layer layout
        bitcompile.load_packed(tmp_path, _mlp)


def test_onnx_export_writes_2bit_and_says_so(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    x = torch.randn(2, 577)
    outputs = []
    for layout in ("2bit", "1.6bit"):
        torch.manual_seed(0)
        model = bitcompile.pack(nn.Sequential(nn.Linear(577, 33)), layout=layout)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bitcompile.export_onnx(model, (x,), tmp_path / f"{layout}.onnx")
        said = [str(w.message) for w in caught if issubclass(w.category, BitcompileWarning) and "1.6bit" in str(w.message)]
        assert len(said) == (1 if layout == "1.6bit" else 0)
        assert model[0].layout == layout  # the user's model is not converted
        session = onnxruntime.InferenceSession(str(tmp_path / f"{layout}.onnx"))
        outputs.append(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (outputs[0] == outputs[1]).all()


@needs_c
def test_pack_warns_when_the_1p6bit_layers_run_the_portable_kernel(monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bitcompile.pack(_mlp(), {"group_size": 64}, layout="1.6bit")
    assert any("portable C kernel (its SIMD kernel covers W1.58A8 with per-row" in str(w.message) for w in caught)
    monkeypatch.setenv("BITCOMPILE_ISA", "avx2")
    if cpu.isa_supported("avx2"):
        with pytest.warns(BitcompileWarning, match="portable C kernel \\(its SIMD kernel needs AVX-512 VBMI; running avx2\\)"):
            bitcompile.pack(_mlp(), layout="1.6bit")
