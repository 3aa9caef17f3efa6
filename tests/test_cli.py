import json
import subprocess
import sys

import bitcompile
from bitcompile.cli import main


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
    assert summary["layers_skipped"] == {"lm_head": "weight is shared with an embedding at embed_tokens"}
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (tmp_path / "report" / "report.json").exists()
    out = capsys.readouterr().out
    assert "training loss" in out and "final loss" in out
