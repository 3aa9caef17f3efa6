"""``bitcompile inspect --mlir FILE``: the rewritten graph as MLIR in torch-mlir's torch dialect.

Our ops stay named custom ops (``torch.operator "torch.bitcpm.ternary_linear"``), so a
downstream MLIR compiler sees exactly where the ternary layers are. torch-mlir's
backend-contract pipeline refuses unknown ``torch.operator``s unless they are declared
legal *and* declared to have value semantics through an extra library; ``export_and_import``
does not expose the second option, so the import is done by hand (the recipe was verified
against torch-mlir 20261001 on torch 2.13, see the project's compile-backend notes).

Parameters become function arguments rather than ``dense_resource`` literals: the file
stays the size of the program, not of the weights. Needs the ``mlir`` extra
(``pip install 'bitcompile[mlir]'``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitcompile.backend import capture
from bitcompile.config import TernaryConfig


class MlirUnavailableError(RuntimeError):
    """torch-mlir is not installed."""


def require_torch_mlir() -> Any:
    try:
        import torch_mlir.fx as tfx
    except ImportError as error:
        raise MlirUnavailableError(
            "--mlir needs torch-mlir, which is not installed: pip install 'bitcompile[mlir]' (or pip install torch-mlir)"
        ) from error
    return tfx


def _custom_ops(gm: torch.fx.GraphModule) -> list[str]:
    """``torch.bitcpm.<op>`` names of the bitcpm ops in the graph (what must stay legal)."""
    names = {
        f"torch.{n.target.namespace}.{n.target._opname}"
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "bitcpm"
    }
    return sorted(names)


def graph_to_mlir(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], func_name: str = "main") -> str:
    """One rewritten Dynamo graph as a torch-dialect MLIR module (text)."""
    tfx = require_torch_mlir()
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    program = torch.export.export(gm, tuple(example_inputs), strict=False)
    program = program.run_decompositions(tfx.get_decomposition_table())
    context = ir.Context()
    torch_d.register_dialect(context)
    importer = tfx.FxImporter(context=context)
    with warnings.catch_warnings():  # torch-mlir 20261001 on torch 2.13: "isinstance(treespec, LeafSpec)"
        warnings.simplefilter("ignore", FutureWarning)
        importer.import_frozen_program(program, func_name=func_name)
    legal = _custom_ops(gm)
    with tempfile.TemporaryDirectory() as tmp:
        library = Path(tmp) / "bitcpm_value_semantics.mlir"
        declarations = "".join(f'  func.func @"__torch_mlir_has_value_semantics_fn.{op}"() {{ return }}\n' for op in legal)
        library.write_text(f"module {{\n{declarations}}}\n")
        options = tfx.FxImportOptions(extra_library_file_name=str(library), backend_legal_ops=legal)
        module = tfx._module_lowering(
            False, False, tfx.OutputType.TORCH, importer.module, fx_import_options=options,
            backend_options=tfx.BackendLoweringOptions(),
        )  # fmt: skip
    return str(module)


def model_to_mlir(model: torch.nn.Module, example_inputs: Sequence[Any], config: TernaryConfig | None = None) -> list[str]:
    """Capture ``model`` like :func:`bitcompile.explain` and return one MLIR module per graph."""
    require_torch_mlir()  # fail before the capture, with the install hint
    records = capture(model, example_inputs, config or TernaryConfig())
    out = []
    for i, record in enumerate(records):
        assert record.graph_module is not None
        out.append(graph_to_mlir(record.graph_module, record.example_inputs, func_name=f"graph{i}" if i else "main"))
    return out


def write_mlir(model: torch.nn.Module, example_inputs: Sequence[Any], path: str | Path, config: TernaryConfig | None = None) -> list[Path]:
    """Write ``path`` (graph 0) and ``<stem>.graph<i><suffix>`` for each further graph; returns the paths."""
    modules = model_to_mlir(model, example_inputs, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, text in enumerate(modules):
        target = path if i == 0 else path.with_name(f"{path.stem}.graph{i}{path.suffix}")
        target.write_text(text)
        written.append(target)
    return written
