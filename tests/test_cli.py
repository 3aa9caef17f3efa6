import json
import subprocess
import sys

import pytest

import bitcompile
from bitcompile.cli import main
from bitcompile.demo import run_demo


def test_version(capsys):
    result = subprocess.run([sys.executable, "-m", "bitcompile.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"bitcompile {bitcompile.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_short_run_writes_plot_and_summary(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--inner", "aot_eager", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["losses"]["fp32"]) == len(summary["losses"]["ternary"]) == 30
    assert summary["losses"]["ternary"][-1] < summary["losses"]["ternary"][0]
    assert summary["layers_skipped"] == {
        "embed_tokens": "embedding: float (lookup table; recipes keep it)",
        "lm_head": "weight is shared with an embedding at embed_tokens",
    }
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (tmp_path / "report" / "report.json").exists()
    out = capsys.readouterr().out
    assert "training loss" in out and "final loss" in out


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_demo_rejects_non_positive_steps(tmp_path, capsys, steps):
    """Issue 15 item 15: --steps 0 used to train nothing and fail with an IndexError."""
    line = _one_line_error(capsys, ["demo", "--steps", steps, "--out", str(tmp_path / "demo")])
    assert line == f"bitcompile demo: error: --steps {steps} is invalid: expected a positive number of training steps"
    assert not (tmp_path / "demo").exists()
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        run_demo(steps=0, out_dir=tmp_path / "demo")


def test_demo_without_matplotlib_names_the_demo_extra(tmp_path, capsys, monkeypatch):
    """matplotlib is the demo extra, not a dependency: its absence is one line, before any training."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    code = main(["demo", "--steps", "2", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("bitcompile demo: error: the demo plots its loss curves with matplotlib")
    assert err.endswith("pip install 'bitcompile[demo]'")
    assert not (tmp_path / "demo").exists()


def test_demo_rejects_a_file_as_out_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = _one_line_error(capsys, ["demo", "--steps", "2", "--out", str(tmp_path / "file")])
    assert line == f"bitcompile demo: error: --out '{tmp_path / 'file'}' is a file, not a folder"


@pytest.mark.parametrize("target, message", [
    ("a_dir", "'{root}/a_dir' is a directory"),
    ("a_file", "'{root}/a_file' exists; pass overwrite=True (CLI: --overwrite)"),
    ("a_file/m.onnx", "cannot write '{root}/a_file/m.onnx': '{root}/a_file' is not a folder"),
])  # fmt: skip
def test_export_checks_the_output_path_before_loading_the_model(tmp_path, capsys, target, message):
    """The model spec does not even exist: the path is what is reported, with exit 2."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("")
    line = _one_line_error(capsys, ["export", "no_such_module_xyz:build", "-o", str(tmp_path / target)])
    assert line.startswith("bitcompile export: error: export_onnx: ") and message.format(root=tmp_path) in line
