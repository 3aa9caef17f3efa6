"""``--mlir``: the rewritten graph in torch-mlir's torch dialect, our op kept as a named custom op."""

import sys

import pytest
import torch

from bitcompile.cli import main
from bitcompile.models import MLP


def _mlp():
    torch.manual_seed(0)
    return MLP(16, [32, 32], 4), (torch.randn(2, 16),)


def test_mlir_keeps_ternary_op_named():
    pytest.importorskip("torch_mlir", reason="torch-mlir is not installed (extra: mlir)")
    from bitcompile.config import TernaryConfig
    from bitcompile.inspect.mlir import model_to_mlir

    model, inputs = _mlp()
    (text,) = model_to_mlir(model, inputs, TernaryConfig(exclude=("out",)))
    assert text.startswith("module") and "func.func @main" in text
    # torch dialect (backend contract): value tensors, our op opaque and named
    assert text.count('torch.operator "torch.bitcpm.ternary_linear"') == 2
    assert "!torch.vtensor<[2,16],f32>" in text
    # the excluded layer stays an ordinary float matmul
    assert "torch.aten.mm" in text or "torch.aten.linear" in text or "torch.aten.addmm" in text


def test_cli_writes_mlir(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch_mlir", reason="torch-mlir is not installed (extra: mlir)")
    (tmp_path / "mods.py").write_text(
        "import torch\nfrom bitcompile.models import MLP\n"
        "def mlp():\n    torch.manual_seed(0)\n    return MLP(16, [32], 4), (torch.randn(2, 16),)\n"
    )
    out = tmp_path / "graph.mlir"
    assert main(["inspect", f"{tmp_path / 'mods.py'}:mlp", "--mlir", str(out)]) == 0
    assert out.read_text().count('"torch.bitcpm.ternary_linear"') == 2
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_without_torch_mlir_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "mods.py").write_text(
        "import torch\ndef lin():\n    return torch.nn.Linear(8, 8), (torch.randn(2, 8),)\n"
    )
    # None in sys.modules makes `import torch_mlir.fx` raise ImportError, as when it is absent.
    monkeypatch.setitem(sys.modules, "torch_mlir", None)
    monkeypatch.setitem(sys.modules, "torch_mlir.fx", None)
    assert main(["inspect", f"{tmp_path / 'mods.py'}:lin", "--mlir", str(tmp_path / "g.mlir")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""  # refused before capturing the model
    assert err.count("\n") == 0 and "needs torch-mlir" in err and "pip install 'bitcompile[mlir]'" in err
    assert not (tmp_path / "g.mlir").exists()
