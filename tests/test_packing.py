"""The canonical 2-bit layout (bitcompile/kernels/packing.py, docs/packed_format.md)."""

from __future__ import annotations

import pytest
import torch

from bitcompile.kernels import cpu, packing
import reference_impl as ref

SHAPES = [(1, 1), (3, 5), (2, 63), (2, 64), (3, 65), (7, 255), (5, 256), (4, 257), (2, 320), (3, 576), (2, 577), (3, 960), (3, 1000), (2, 4097)]
GROUPS = [-1, "tensor", 32, 64, 128, 48]


def _codes(n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = ref.ternary_codes(torch.randn(n, k, generator=g), group_size)
    return q.to(torch.int8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_pack_codes_round_trip(shape, group_size):
    q = _codes(*shape, group_size)
    packed = packing.pack_codes(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packing.packed_shape(*shape)
    assert packed.shape[1] * 4 % packing.PAD_K == 0
    assert packed.shape[1] * 4 == -(-shape[1] // 64) * 64  # v2 pads K only to a multiple of 64
    assert torch.equal(packing.unpack_codes(packed, shape[1]), q)


def test_pack_codes_byte_layout_matches_the_diagram():
    # one row, K = 600 -> Kp = 640: 2 full blocks of 256 (byte j of block b holds k = 256 b + 64 i + j
    # at bits 2i..2i+1), then 2 tail chunks of 16 bytes (byte j of chunk c holds k = 512 + 64 c + 16 i + j)
    k = 600
    q = torch.zeros(1, k, dtype=torch.int8)
    q[0, 0] = 1  # block 0, byte 0, plane 0 -> c=2 at bits 1..0
    q[0, 65] = -1  # block 0, byte 1, plane 1 -> c=0 at bits 3..2
    q[0, 256 + 192 + 5] = 1  # block 1, byte 5, plane 3 -> c=2 at bits 7..6
    q[0, 512 + 16 * 2 + 7] = -1  # tail chunk 0, byte 7, plane 2 -> c=0 at bits 5..4
    q[0, 512 + 64 + 16 * 1 + 3] = 1  # tail chunk 1, byte 3, plane 1 -> c=2 at bits 3..2
    p = packing.pack_codes(q)[0]
    assert p.shape[0] == 2 * 64 + 2 * 16
    assert p[0].item() == 0b01_01_01_10
    assert p[1].item() == 0b01_01_00_01
    assert p[64 + 5].item() == 0b10_01_01_01
    assert p[2].item() == 0b01_01_01_01  # all zero weights: c = 1 everywhere
    assert p[128 + 7].item() == 0b01_00_01_01
    assert p[128 + 16 + 3].item() == 0b01_01_10_01
    # k >= 600 is padding: the zero weight (c = 1); tail chunk 1 holds k = 576..639 -> byte j, plane i: k = 576 + 16 i + j
    assert p[128 + 16 + 10].item() == 0b01_01_01_01  # k = 586 (real, zero), 602, 618, 634 (padding)


def test_pack_codes_is_planar_so_a_shift_gives_contiguous_k():
    q = _codes(2, 512 + 192, -1)
    p = packing.pack_codes(q)
    assert p.shape[1] == 2 * 64 + 3 * 16
    for b in range(2):
        blk = p[:, 64 * b : 64 * (b + 1)]
        for i in range(4):
            plane = ((blk >> (2 * i)) & 3).to(torch.int8) - 1
            assert torch.equal(plane, q[:, 256 * b + 64 * i : 256 * b + 64 * (i + 1)])
    for c in range(3):  # tail chunks: planes of 16 contiguous k
        chunk = p[:, 128 + 16 * c : 128 + 16 * (c + 1)]
        for i in range(4):
            plane = ((chunk >> (2 * i)) & 3).to(torch.int8) - 1
            assert torch.equal(plane, q[:, 512 + 64 * c + 16 * i : 512 + 64 * c + 16 * (i + 1)])


@pytest.mark.parametrize("bad", [2, -2, 5])
def test_pack_codes_rejects_non_ternary_codes(bad):
    q = torch.zeros(2, 10, dtype=torch.int8)
    q[1, 3] = bad
    with pytest.raises(ValueError, match=r"ternary in \{-1, 0, 1\} \(found " + str(bad)):
        packing.pack_codes(q)
    with pytest.raises(ValueError, match="ternary"):
        cpu.pack_codes(q)


def test_pack_codes_rejects_bad_types_and_shapes():
    with pytest.raises(TypeError, match="integer tensor"):
        packing.pack_codes(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must be 2-D"):
        packing.pack_codes(torch.zeros(3, dtype=torch.int8))


def test_unpack_codes_checks_size_and_codes():
    p = packing.pack_codes(_codes(3, 300, -1))
    with pytest.raises(ValueError, match="needs 64"):
        packing.unpack_codes(p, 200)
    assert p.shape[1] == 80
    with pytest.raises(TypeError, match="uint8"):
        packing.unpack_codes(p.to(torch.int8), 300)
    bad = p.clone()
    bad[0, 0] = 0xFF
    with pytest.raises(ValueError, match="invalid 2-bit code 3"):
        packing.unpack_codes(bad, 300)


def test_pack_empty_shapes():
    assert packing.pack_codes(torch.zeros(0, 5, dtype=torch.int8)).shape == (0, 16)
    assert packing.pack_codes(torch.zeros(3, 0, dtype=torch.int8)).shape == (3, 0)
    assert packing.unpack_codes(torch.zeros(3, 0, dtype=torch.uint8), 0).shape == (3, 0)


def test_layout_has_a_name_and_version():
    assert packing.LAYOUT_NAME == "bc_i2_planar256_t64" and packing.LAYOUT_VERSION == 2


@pytest.mark.skipif(not cpu.available(), reason="C kernels not built")
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_pack_codes_matches_python_pack(shape):
    q = _codes(*shape, 64, seed=3)
    assert torch.equal(cpu.pack_codes(q), packing.pack_codes(q))
    big = _codes(300, 4100, -1, seed=4)  # large enough to use the threaded C packer
    assert torch.equal(cpu.pack_codes(big), packing.pack_codes(big))
    # a strided (non-contiguous) view packs the same
    assert torch.equal(cpu.pack_codes(big[:, 7:1000]), packing.pack_codes(big[:, 7:1000].contiguous()))
