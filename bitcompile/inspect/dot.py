"""A :class:`~bitcompile.inspect.view.GraphView` in graphviz's DOT language, and its SVG laid out by ``dot``.

Same node ids, colours and clusters as the built-in layout (:mod:`bitcompile.inspect.layered_svg`),
and the same ``data-role`` / ``data-layer`` attributes, so the HTML page's script treats both alike.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess

from bitcompile.inspect.view import STYLES, GraphView, ViewNode, legend_roles


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(view: GraphView, title: str = "") -> str:
    """The view in graphviz's DOT language (same ids, colours and clusters as the built-in layout)."""
    cells = "".join(
        f'<TD BGCOLOR="{STYLES[r][0]}" COLOR="{STYLES[r][1]}" BORDER="1"> </TD><TD ALIGN="LEFT">{html.escape(STYLES[r][2])}</TD>'
        for r in legend_roles(view)
    )
    lines = [
        "digraph G {",
        f"  graph [tooltip={_dot_string(title)}, fontname=monospace, fontsize=12, nodesep=0.25, ranksep=0.3];",
        f'  legend [id="legend", shape=plaintext, style="", fontsize=11, label=<<TABLE BORDER="0" CELLSPACING="4">'
        f"<TR>{cells}</TR></TABLE>>];",
        '  node [shape=box, style="rounded,filled", fontname=monospace, fontsize=11, height=0.45];',
        "  edge [color=\"#888888\", arrowsize=0.6];",
    ]

    def node_line(n: ViewNode) -> str:
        fill, stroke, _ = STYLES.get(n.role, STYLES["plain"])
        style = '"rounded,filled,dashed"' if n.role in ("collapsed", "ref") else '"rounded,filled"'
        label = n.label + (("\n" + n.sublabel) if n.sublabel else "")
        return (
            f"    {_dot_string(n.id)} [id={_dot_string(n.id)}, label={_dot_string(label)}, fillcolor=\"{fill}\", "
            f"color=\"{stroke}\", style={style}, tooltip={_dot_string(n.title)}];"
        )

    in_cluster = {m for members in view.clusters.values() for m in members}
    for k, (name, members) in enumerate(view.clusters.items()):
        lines.append(
            f"  subgraph cluster_{k} {{ label={_dot_string(name)}; style=dashed; color=\"#b9b3d6\"; fontcolor=\"#5b3fa6\";"
        )
        member_set = set(members)
        lines += [node_line(n) for n in view.nodes if n.id in member_set]
        lines.append("  }")
    lines += [node_line(n) for n in view.nodes if n.id not in in_cluster]
    lines += [f"  {_dot_string(a)} -> {_dot_string(b)};" for a, b in view.edges]
    if view.nodes:  # keep the legend above the drawing
        lines.append(f"  legend -> {_dot_string(view.nodes[0].id)} [style=invis];")
    lines.append("}")
    return "\n".join(lines)


def render_svg_dot(view: GraphView, title: str = "", timeout: float = 60.0) -> str:
    """SVG laid out by graphviz ``dot``; raises ``RuntimeError`` if dot is missing or fails."""
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError("graphviz 'dot' is not on PATH")
    proc = subprocess.run(
        [dot, "-Tsvg"], input=to_dot(view, title), capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dot failed: {proc.stderr.strip().splitlines()[:1]}")
    svg = proc.stdout[proc.stdout.index("<svg") :]
    svg = re.sub(r"<svg ", '<svg class="bc-graph" data-engine="dot" ', svg, count=1)
    # Same data attributes as the built-in layout, so the page's script treats both alike.
    by_id = {n.id: n for n in view.nodes}

    def tag(match: re.Match) -> str:
        n = by_id.get(html.unescape(match.group(1)))
        if n is None:
            return match.group(0)
        return f'{match.group(0)[:-1]} data-role="{n.role}" data-layer="{html.escape(n.layer, quote=True)}">'

    return re.sub(r'<g id="([^"]+)" class="node">', tag, svg)
