"""The fast CI subset of the support matrix (benchmarks/support_matrix.py writes docs/support.md
from the full sweep): a few architectures through every step, each cell ✅ / ❌ with its reason."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "support_matrix.py"


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("support_matrix", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["support_matrix"] = module
    spec.loader.exec_module(module)
    return module


def test_a_decoder_only_lm_passes_every_step(matrix):
    row = matrix.run_arch(matrix.ARCHS["GPT-2"])
    assert set(row) == set(matrix.COLUMNS)
    for column in ("compile + train", "explain", "pack + save/load", "ONNX + ORT", "generation"):
        assert row[column].startswith(matrix.OK), (column, row[column])
    assert row["MoE experts"] == row["ONNX encoder"] == matrix.NA
    assert "embedding" in row["explain"] and "weight is shared with…" in row["explain"]  # GPT-2 ties its head


def test_an_encoder_decoder_onnx_cell_carries_the_refusal_line(matrix):
    from bitcompile.export.results import OnnxExportError

    with pytest.raises(OnnxExportError) as error:  # refused before anything is packed: the packed model is not read
        matrix.check_onnx(matrix.ARCHS["T5"], packed=None)
    assert matrix._why(error.value).startswith(
        "OnnxExportError: export_onnx: T5ForConditionalGeneration is an encoder-decoder model"
    )


def test_a_failing_step_becomes_a_cross_with_the_exception_text(matrix):
    broken = matrix.Arch("broken", lambda: (_ for _ in ()).throw(ValueError("no such config\nsecond line")), "encoder")
    row = matrix.run_arch(broken)
    assert row["explain"] == f"{matrix.FAIL} ValueError: no such config"
    assert row["MoE experts"] == matrix.NA  # not an MoE model: nothing to report
    assert "second line" not in matrix.render({"broken": row}, 0.0)


def test_render_writes_one_markdown_row_per_architecture(matrix):
    text = matrix.render({"A": {c: matrix.OK for c in matrix.COLUMNS}, "B": {c: f"{matrix.FAIL} x" for c in matrix.COLUMNS}}, 1.0)
    rows = [line for line in text.splitlines() if line.startswith("| A |") or line.startswith("| B |")]
    assert len(rows) == 2 and all(line.count("|") == len(matrix.COLUMNS) + 2 for line in rows)
