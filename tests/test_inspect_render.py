"""The graph picture: what is folded and collapsed, and that both layouts draw a readable SVG."""

import shutil
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitcompile
from bitcompile.backend import CompiledGraph
from bitcompile.inspect.records import GraphReport
from bitcompile.inspect.render import STYLES, build_view, render_svg, render_svg_python, roles
from bitcompile.passes.describe import GraphNode
from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def llama12():
    """12 decoder layers, one projection excluded in layer 5: that block must stay expanded."""
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(num_layers=12))
    return bitcompile.explain(model, torch.randint(0, 64, (1, 8)), exclude=["layers.5.mlp.up_proj"])


def _boxes(svg: str):
    root = ET.fromstring(svg)
    out = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "node":
            rect = g.find(f"{SVG}rect")
            x, y, w, h = (float(rect.get(k)) for k in ("x", "y", "width", "height"))
            out.append((g.get("id"), g.get("data-role"), rect.get("fill"), (x, y, x + w, y + h)))
    return root, out


def test_view_collapses_repeated_blocks_and_keeps_odd_one(llama12):
    graph = llama12.graphs[0]
    view = build_view(graph)
    counts = roles(view)
    # layers.0 expanded (7 ternary), layers.5 expanded (6 ternary + 1 skipped), the rest collapsed
    assert counts["ternary"] == 13 and counts["skipped"] == 2  # + the tied lm_head
    assert counts["collapsed"] == 2 and view.collapsed_blocks == 10
    labels = [n.label for n in view.nodes if n.role == "collapsed"]
    assert labels == ["layers.1 … layers.4", "layers.6 … layers.11"]
    assert set(view.clusters) == {"layers.0", "layers.5"}
    # every candidate layer is accounted for: drawn, or counted inside a collapsed box
    hidden_ternary = sum(int(n.sublabel.split(": ")[1].split(" ternary")[0]) for n in view.nodes if n.role == "collapsed")
    assert counts["ternary"] + hidden_ternary == len(llama12.rewritten)
    # RMSNorm's ops are folded into one box per norm
    assert any(n.label == "RMSNorm" and "9 ops" in n.sublabel for n in view.nodes)
    assert len(view.nodes) < len(graph.nodes) / 10


def test_view_without_repeats_keeps_everything():
    torch.manual_seed(0)
    report = bitcompile.explain(MLP(16, [32, 32], 4), torch.randn(2, 16))
    view = build_view(report.graphs[0])
    assert roles(view) == {"input": 1, "ternary": 3, "plain": 2, "output": 1}
    assert [n.sublabel for n in view.nodes if n.role == "ternary"] == ["hidden.0  32x16", "hidden.1  32x32", "out  4x32"]
    assert view.collapsed_blocks == 0


def test_python_layout_is_a_readable_svg(llama12):
    svg, view = render_svg(llama12.graphs[0], engine="python", title="graph 0")
    root, boxes = _boxes(svg)
    assert root.get("data-engine") == "python"
    assert len(boxes) == len(view.nodes)
    width, height = float(root.get("width")), float(root.get("height"))
    for node_id, role, fill, (x0, y0, x1, y1) in boxes:
        assert fill == STYLES[role][0], node_id  # colour tells the role
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    for i, (_, _, _, a) in enumerate(boxes):  # no two boxes overlap
        for _, _, _, b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    edges = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    assert len(edges) == len(view.edges)
    legend = {g.get("data-role") for g in root.iter(f"{SVG}g") if g.get("class") == "legend-item"}
    assert {"ternary", "skipped", "plain", "collapsed"} <= legend
    assert height < 3000  # 12 layers stay one screenful or three, not thirty


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' is not installed (the built-in layout is used)")
def test_dot_layout_has_the_same_nodes(llama12):
    svg, view = render_svg(llama12.graphs[0], engine="dot")
    root = ET.fromstring(svg)
    assert root.get("data-engine") == "dot"
    ids = {g.get("id") for g in root.iter(f"{SVG}g") if g.get("class") == "node"}
    assert {n.id for n in view.nodes} <= ids
    fills = {p.get("fill") for p in root.iter(f"{SVG}path")} | {p.get("fill") for p in root.iter(f"{SVG}polygon")}
    assert {STYLES["ternary"][0], STYLES["skipped"][0], STYLES["collapsed"][0]} <= fills


def test_auto_engine_without_dot_uses_builtin_layout(llama12, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    svg, _ = render_svg(llama12.graphs[0], engine="auto")
    assert 'data-engine="python"' in svg[:300]
    with pytest.raises(RuntimeError, match="'dot' is not on PATH"):
        render_svg(llama12.graphs[0], engine="dot")
    with pytest.raises(ValueError, match="engine='png' is invalid"):
        render_svg(llama12.graphs[0], engine="png")


# --- Any graph the capture can produce draws: a property test over made-up graphs ---------------

_MODULES = ["", "model", "model.rotary", "apply_rotary_pos_emb"] + [
    f"model.layers.{k}{sub}" for k in range(4) for sub in ("", ".attn", ".attn.q", ".mlp", ".mlp.act", ".mlp.experts")
]


@st.composite
def _graphs(draw):
    """A random DAG in the shape of a captured graph: blocks repeated from a template (so some
    collapse), then mutated: nodes moved to other modules, inputs that name removed nodes,
    helpers placed before their op, rewritten layers whose ops are not contiguous."""
    roles = st.sampled_from(["plain", "plain", "plain", "ternary", "inserted", "skipped"])
    template = draw(st.lists(st.tuples(roles, st.sampled_from(["", ".attn", ".attn.q", ".mlp", ".mlp.act"]),
                                       st.sampled_from(["q", "k", "mlp.up", "mlp.down"]),
                                       st.lists(st.integers(1, 4), max_size=3)), min_size=1, max_size=8))  # fmt: skip
    blocks = draw(st.integers(1, 5))
    nodes = [GraphNode("x", "placeholder", "x", [], "", "input"), GraphNode("w", "placeholder", "model.w", [], "", "parameter")]
    for b in range(blocks):
        for i, (role, sub, layer, back) in enumerate(template):
            name = f"b{b}_{i}"
            inputs = [nodes[max(len(nodes) - d, 0)].name for d in back] or [nodes[-1].name]
            layer_name = f"model.layers.{b}.{layer}" if role != "plain" else ""
            module = layer_name or f"model.layers.{b}{sub}"
            nodes.append(GraphNode(name, "call_function", "op" if role == "plain" else "bitcpm.ternary_linear",
                                   inputs, module, role, layer_name))  # fmt: skip
    for _ in range(draw(st.integers(0, 6))):  # mutations
        k = draw(st.integers(2, len(nodes) - 1))
        n = nodes[k]
        what = draw(st.sampled_from(["module", "ghost", "param", "role", "layer"]))
        if what == "module":
            n.module = draw(st.sampled_from(_MODULES))
        elif what == "ghost":
            n.inputs.append("removed_node")
        elif what == "param":
            n.inputs.append("w")
        elif what == "role":
            n.role = draw(roles)
        else:
            n.layer = draw(st.sampled_from(["", "model.layers.0.q", "model.layers.1.mlp.up"]))
    used = {a for n in nodes for a in n.inputs}
    nodes.append(GraphNode("output", "output", "output", [n.name for n in nodes[2:] if n.name not in used][-3:], "", "output"))
    layers = sorted({n.layer for n in nodes if n.layer})
    decisions = [SimpleNamespace(name=name, reason="r", out_features=8, in_features=8) for name in layers]
    return GraphReport(0, CompiledGraph("0/0", None, "", "", decisions, "reference", nodes))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_graphs())
def test_any_captured_shape_draws(graph):
    view = build_view(graph)
    index = {n.id: i for i, n in enumerate(view.nodes)}
    assert len(index) == len(view.nodes)
    for src, dst in view.edges:  # boxes come in topological order: the picture has no cycle
        assert index[src] < index[dst]
    ET.fromstring(render_svg_python(view, "g"))
    # without collapsing, every layer with a ternary op is a ternary box of its own
    drawn = {n.layer for n in build_view(graph, collapse_min=10**9).nodes if n.role == "ternary"}
    assert drawn == {n.layer for n in graph.nodes if n.role == "ternary"}
