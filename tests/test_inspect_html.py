"""``report.to_html(dir)``: self-contained, with the tables, pictures and highlighted code."""

import re

import pytest
import torch

import bitcompile
from bitcompile.models import TinyLlama, TinyLlamaConfig


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(num_layers=4))
    return bitcompile.explain(model, torch.randint(0, 64, (1, 8)), group_size=32, exclude=["layers.2.self_attn.v_proj"])


@pytest.mark.parametrize("engine", ["python", "dot"])
def test_page_is_self_contained_and_complete(report, tmp_path, engine):
    if engine == "dot":
        pytest.importorskip("shutil").which("dot") or pytest.skip("graphviz 'dot' is not installed")
    page_path = report.to_html(tmp_path, engine=engine)
    page = page_path.read_text()
    assert page_path.name == "index.html" and (tmp_path / "graph_0.svg").exists()
    # no network: nothing loaded from elsewhere, and a CSP that forbids it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "default-src 'none'" in page
    # one table row per candidate layer, with its decision
    rows = re.findall(r'<tr class="(rewritten|skipped)" data-layer="([^"]+)"', page)
    assert len(rows) == len(report.layers) == 30  # embed_tokens (listed float) + 4 x 7 + the tied lm_head
    assert dict((name, css) for css, name in rows)["embed_tokens"] == "skipped"
    assert dict((name, css) for css, name in rows)["layers.2.self_attn.v_proj"] == "skipped"
    assert "excluded by pattern" in page and "weight is shared with an embedding" in page
    # code before/after with the rewritten lines highlighted: one per replaced / new node
    graph = report.graphs[0]
    assert page.count('class="line replaced"') == len(report.rewritten) == 27
    new_nodes = sum(1 for n in graph.nodes if n.role in ("ternary", "inserted"))
    assert page.count('class="line rewritten"') == new_nodes
    # a skipped candidate's call line, before and after (the embedding lookup is listed, not highlighted)
    assert page.count('class="line skipped"') == 2 * len([d for d in report.skipped if d.kind != "embedding"])
    # the picture, inline, with the legend
    assert page.count("<svg") == 1 and 'class="legend"' in page
    assert f'data-engine="{engine}"' in page


def test_page_escapes_names(report, tmp_path):
    page = report.to_html(tmp_path, title="<script>alert(1)</script>", engine="python").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
