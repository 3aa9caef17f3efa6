"""``bitcompile inspect --html`` on Hugging Face models, as saved by transformers (issue 20).

Each architecture is a tiny random model saved to a folder and inspected through the
command line, the way a user does it; each attention implementation (eager, sdpa, flex) is
picked on the model itself, since the folder does not keep it. The page must have one picture
per graph and every rewritten layer must be a green box in it (two decoder layers: nothing is
collapsed). A picture that cannot be drawn must not take the report down.
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

from bitcompile.cli import main

transformers = pytest.importorskip("transformers")

SVG = "{http://www.w3.org/2000/svg}"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config)


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


ARCHITECTURES = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "mixtral": _mixtral}


def save_tiny(name: str, folder):
    """Save a tiny random ``name`` model (see ARCHITECTURES) into ``folder`` as safetensors."""
    import torch

    torch.manual_seed(0)
    ARCHITECTURES[name]().save_pretrained(folder, safe_serialization=True)
    return folder


def check_page(html_dir, report: dict) -> list[str]:
    """What is wrong with an ``inspect --html`` page, given the JSON report of the same run ([] if nothing).

    One inline SVG per graph and a ``graph_<i>.svg`` beside the page; every rewritten layer a
    ternary box (``data-role="ternary"``) in its graph's picture; no picture replaced by a note.
    """
    page = (html_dir / "index.html").read_text()
    problems = []
    if "picture-failed" in page.split("</style>", 1)[1]:
        problems.append("a picture was replaced by a note")
    pictures = re.findall(r'<div class="picture" data-graph="(\d+)">(.*?)</div>', page, re.S)
    if len(pictures) != len(report["graphs"]):
        problems.append(f"{len(pictures)} pictures for {len(report['graphs'])} graphs")
    for index, svg in pictures:
        graph = report["graphs"][int(index)]
        if not (html_dir / f"graph_{index}.svg").is_file():
            problems.append(f"graph_{index}.svg is missing")
        root = ET.fromstring(svg)
        green = {g.get("data-layer") for g in root.iter(f"{SVG}g") if g.get("data-role") == "ternary"}
        missing = sorted(layer["name"] for layer in graph["layers"] if layer["rewritten"] and layer["name"] not in green)
        if missing:
            problems.append(f"graph {index}: rewritten layers without a green box: {missing}")
    return problems


@pytest.mark.parametrize("layout", ["graphviz", "built-in"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_inspect_html_on_hf_model(arch, layout, tmp_path, monkeypatch, capsys):
    if layout == "graphviz" and shutil.which("dot") is None:
        pytest.skip("graphviz 'dot' is not installed (.ci/run installs it where apt-get is usable)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_tiny(arch, tmp_path / arch)
    if layout == "built-in":
        monkeypatch.setenv("PATH", "/nonexistent")  # no dot: the built-in layout draws
    out = tmp_path / "html"
    assert main(["inspect", str(folder), "--html", str(out), "--json", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "Traceback" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["rewritten"] >= 8  # 2 blocks x (attention + MLP or router) at least
    assert check_page(out, report) == []
    assert f'data-engine="{"dot" if layout == "graphviz" else "python"}"' in (out / "index.html").read_text()


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_html_on_each_attention_implementation(attn, tmp_path):
    """transformers dispatches attention by ``config._attn_implementation`` (not saved with the folder)."""
    import torch

    import bitcompile

    torch.manual_seed(0)
    model = _llama()
    model.config._attn_implementation = attn
    report = bitcompile.explain(model.eval(), torch.randint(0, 128, (1, 8)))
    out = tmp_path / attn
    report.to_html(out)
    assert check_page(out, report.to_json()) == []
    if attn != "flex_attention":  # flex builds its block mask in a graph of its own (a graph break)
        assert report.graph_count == 1
    # the attention's reshapes, rotary embedding and the attention itself are one box per block
    # (after flex's graph break Dynamo resumes inside LlamaModel: paths there lack "model.")
    page = (out / "index.html").read_text()
    assert len(re.findall(r">(?:model\.)?layers\.0\.self_attn · \d+ ops<", page)) == 1


def test_failing_picture_leaves_the_page_and_exit_0(tmp_path, monkeypatch, capsys):
    """A picture that fails is one warning line; the page keeps its tables and code, JSON is written."""
    import bitcompile.inspect.html as html_module

    def broken(*args, **kwargs):
        raise KeyError("attn_output")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(html_module, "render_svg", broken)
    folder = save_tiny("llama", tmp_path / "llama")
    out, json_path = tmp_path / "html", tmp_path / "r.json"
    assert main(["inspect", str(folder), "--html", str(out), "--json", str(json_path)]) == 0
    # transformers' own progress bars aside, stderr has one line
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(err) == 1 and err[0].startswith("bitcompile inspect: warning: the picture of graph 0 could not be drawn")
    assert "KeyError: 'attn_output'" in err[0]
    page = (out / "index.html").read_text()
    assert 'class="picture-failed"' in page and "<svg" not in page
    assert 'data-layer="model.layers.1.mlp.down_proj"' in page  # the layer table
    assert 'class="line replaced"' in page  # the code before / after
    assert json_path.is_file() and not (out / "graph_0.svg").exists()
    # --debug: the same, with the traceback
    assert main(["inspect", str(folder), "--html", str(out), "--debug"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" in err and "warning: the picture of graph 0" in err
