"""The target registry (bitcompile.targets), the C library's ABI check, and what the cpu target imports."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest
import torch

from bitcompile import targets
from bitcompile.cli import build_parser
from bitcompile.config import TernaryConfig, TernaryConfigError
from bitcompile.kernels import cpu, reference
from bitcompile.kernels.cpu import library


def test_names_come_from_the_registry(capsys):
    names = targets.target_names()
    assert names == ("auto", "reference", "cpu", "cann")
    for name in names:
        assert TernaryConfig(target=name).target == name
    with pytest.raises(TernaryConfigError, match="one of auto, reference, cpu, cann"):
        TernaryConfig(target="tpu")
    assert build_parser().parse_args(["inspect", "m:f", "--target", "cann"]).target == "cann"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["inspect", "m:f", "--target", "tpu"])
    assert "choose from auto, reference, cpu, cann" in capsys.readouterr().err.replace("'", "")


def test_a_registered_target_is_known_everywhere(monkeypatch):
    monkeypatch.setattr(targets, "_registry", dict(targets._registry))
    fake = targets.register_target(
        targets.Target("fake", "reference kernels under another name", "bitcompile.kernels.reference", fallback="cpu")
    )
    assert "fake" in targets.target_names() and TernaryConfig(target="fake").target == "fake"
    assert targets.get_target("fake") is fake and targets.get_kernel("fake") is reference
    assert targets.resolve_target("fake") == "fake"
    assert targets.resolve_target("auto") == ("cpu" if cpu.available() else "reference")  # not ranked for auto
    with pytest.raises(ValueError, match="already registered"):
        targets.register_target(fake)
    with pytest.raises(ValueError, match="reserved"):
        targets.register_target(targets.Target("auto", "", "bitcompile.kernels.reference"))
    with pytest.raises(ValueError, match="register its fallback 'gpu' first"):
        targets.register_target(targets.Target("other", "", "bitcompile.kernels.reference", fallback="gpu"))


def test_unavailable_targets_fall_back_and_kernels_are_checked(monkeypatch):
    monkeypatch.setattr(targets, "_registry", dict(targets._registry))
    targets.register_target(
        targets.Target(
            "broken", "never available", "bitcompile.kernels.packing", unavailable_reason=lambda: "no device",
            fallback="reference",
        )
    )
    assert targets.resolve_target("broken") == "reference"
    with pytest.raises(TypeError, match="bitcompile.kernels.packing lacks quantize_weight"):
        targets.get_kernel("broken")
    targets.register_target(targets.Target("stuck", "", "bitcompile.kernels.reference", unavailable_reason=lambda: "x"))
    with pytest.raises(RuntimeError, match="'stuck' cannot run here: x"):
        targets.resolve_target("stuck")
    with pytest.raises(ValueError, match="unknown bitcpm kernel 'nope'; available: reference, cpu, cann, broken"):
        targets.get_kernel("nope")
    with pytest.raises(ValueError, match="unknown bitcpm target 'nope'"):
        targets.resolve_target("nope")


def test_auto_picks_cann_for_npu_inputs_only():
    assert targets.get_target("cann").selects([torch.zeros(1)]) is False
    assert targets.resolve_target("auto", [torch.zeros(1)]) in ("cpu", "reference")
    assert targets.get_target("cann").lowering is not None and targets.get_target("cpu").lowering is None
    assert not targets.get_target("cann").precomputed_scales


@pytest.mark.skipif(not cpu.available(), reason=f"C kernels not built: {cpu.unavailable_reason()}")
def test_ctypes_structs_match_the_c_header():
    assert library.abi_mismatch(library.LIB) is None
    for which, struct in library.SHARED_STRUCTS.items():
        assert library.LIB.bc_struct_size(which) == ctypes.sizeof(struct)


@pytest.mark.skipif(not cpu.available(), reason=f"C kernels not built: {cpu.unavailable_reason()}")
def test_a_library_of_another_abi_is_refused(monkeypatch):
    class GemmArgsWithAnExtraField(ctypes.Structure):
        _fields_ = [*library.GemmArgs._fields_, ("added_in_python_only", ctypes.c_int64)]

    monkeypatch.setitem(library.SHARED_STRUCTS, 0, GemmArgsWithAnExtraField)
    lib, reason = library.load(library.find_library())
    assert lib is None
    size = ctypes.sizeof(GemmArgsWithAnExtraField)
    assert f"GemmArgsWithAnExtraField is {size} bytes in Python, {size - 8} in C" in reason
    assert "running the reference kernels" in reason and "Rebuild" in reason


_SNAPSHOTS = """
import json, sys
import torch, bitcompile
from bitcompile.config import TernaryConfig

def loaded():
    return sorted(m for m in sys.modules if m.startswith("bitcompile"))

m = torch.nn.Linear(64, 32)
bitcompile.compile(m, TernaryConfig(target="cpu", inner="eager"))(torch.randn(2, 64))
after_cpu_compile = loaded()
import bitcompile.kernels.npu_ops as npu_ops
after_npu_ops = loaded()
provider = npu_ops.ensure_npu_ops()
print(json.dumps([after_cpu_compile, after_npu_ops, provider, loaded()]))
"""


def test_the_npu_emulator_is_imported_only_when_it_provides_the_npu_ops():
    """One fresh process (these tests' own process has imported everything already)."""
    out = subprocess.run([sys.executable, "-c", _SNAPSHOTS], capture_output=True, text=True, check=True)
    after_cpu_compile, after_npu_ops, provider, after_provider = json.loads(out.stdout.splitlines()[-1])
    assert "bitcompile.backend" in after_cpu_compile  # the compile really ran
    cann_side = ("bitcompile.kernels.npu", "bitcompile.kernels.cann", "bitcompile.passes.lower_cann")
    assert not [m for m in after_cpu_compile if m.startswith(cann_side)]
    assert "bitcompile.kernels.npu_emulator" not in after_npu_ops
    if provider == "emulator":  # no torch_npu on this machine
        assert "bitcompile.kernels.npu_emulator" in after_provider


def test_the_old_kernel_lookup_names_still_work():
    import bitcompile.kernels as kernels

    assert kernels.get_kernel is targets.get_kernel and kernels.resolve_target is targets.resolve_target
    assert kernels.KERNEL_NAMES == ("reference", "cpu", "cann")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kernels.nothing  # noqa: B018
