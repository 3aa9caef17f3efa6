"""The built-in layout of a :class:`~bitcompile.inspect.view.GraphView`, drawn as SVG (no external tools).

The Sugiyama recipe, small: longest-path layers (then as late as possible, so a value sits
just above its first use), one dummy node per layer a long edge crosses, barycenter
ordering, and x positions pulled towards the neighbours' centres. Used when graphviz
``dot`` is not on PATH; it produces the same node ids and colours as :mod:`bitcompile.inspect.dot`.
"""

from __future__ import annotations

import dataclasses
import html
from collections import defaultdict
from collections.abc import Sequence

from bitcompile.inspect.view import CHAR_WIDTH, STYLES, GraphView, legend_roles

_FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
_NODE_H = 38.0
_LAYER_GAP = 30.0
_NODE_GAP = 18.0
_MARGIN = 16.0


@dataclasses.dataclass
class _Placed:
    x: float  # centre
    y: float  # top
    w: float
    h: float


def _layout(view: GraphView) -> tuple[dict[str, _Placed], dict[tuple[str, str], list[tuple[float, float]]], float, float]:
    """Sugiyama-style layout: returns node boxes, edge polylines, width, height."""
    index = {n.id: i for i, n in enumerate(view.nodes)}
    preds: dict[str, list[str]] = defaultdict(list)
    for src, dst in view.edges:
        preds[dst].append(src)
    succs: dict[str, list[str]] = defaultdict(list)
    for src, dst in view.edges:
        succs[src].append(dst)
    rank: dict[str, int] = {}
    for n in view.nodes:  # nodes come in topological order
        rank[n.id] = 1 + max((rank[p] for p in preds[n.id] if p in rank), default=-1)
    # As late as possible: a value sits just above its first use (inputs stay on top), which
    # keeps edges short.
    for n in reversed(view.nodes):
        if succs[n.id] and n.role != "input":
            rank[n.id] = min(rank[s] for s in succs[n.id]) - 1
    # Long edges get one dummy node per layer they cross, so they get a lane of their own.
    width = {n.id: n.width for n in view.nodes}
    chains: dict[tuple[str, str], list[str]] = {}
    up: dict[str, list[str]] = defaultdict(list)
    down: dict[str, list[str]] = defaultdict(list)
    for src, dst in view.edges:
        chain = [src]
        for r in range(rank[src] + 1, rank[dst]):
            dummy = f"\0{src}>{dst}#{r}"
            rank[dummy], width[dummy] = r, 4.0
            chain.append(dummy)
        chain.append(dst)
        chains[(src, dst)] = chain
        for a, b in zip(chain, chain[1:]):
            down[a].append(b)
            up[b].append(a)
    layers: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for node_id in sorted(rank, key=lambda k: (rank[k], index.get(k, len(index)))):
        layers[rank[node_id]].append(node_id)
    pos = {node_id: float(i) for layer in layers for i, node_id in enumerate(layer)}
    for sweep in range(4):  # barycenter ordering, alternating directions
        sequence = layers[1:] if sweep % 2 == 0 else layers[-2::-1]
        neighbours = up if sweep % 2 == 0 else down
        for layer in sequence:
            def key(node_id: str) -> tuple[float, float]:
                near = neighbours[node_id]
                return (sum(pos[m] for m in near) / len(near) if near else pos[node_id], pos[node_id])
            layer.sort(key=key)
            for i, node_id in enumerate(layer):
                pos[node_id] = float(i)
    # x: place each layer near the mean of its neighbours' centres, keeping order and gaps.
    x: dict[str, float] = {}
    for layer in layers:
        left = 0.0
        for node_id in layer:
            x[node_id] = left + width[node_id] / 2
            left += width[node_id] + _NODE_GAP
    for sweep in range(6):
        sequence = layers[1:] if sweep % 2 == 0 else layers[-2::-1]
        neighbours = up if sweep % 2 == 0 else down
        for layer in sequence:
            want = [
                sum(x[m] for m in neighbours[n]) / len(neighbours[n]) if neighbours[n] else x[n] for n in layer
            ]
            placed = list(want)
            for i in range(1, len(layer)):
                gap = (width[layer[i - 1]] + width[layer[i]]) / 2 + _NODE_GAP
                placed[i] = max(placed[i], placed[i - 1] + gap)
            shift = sum(w - p for w, p in zip(want, placed)) / len(layer)
            for node_id, p in zip(layer, placed):
                x[node_id] = p + shift
    low = min((x[n] - width[n] / 2 for n in x), default=0.0)
    high = max((x[n] + width[n] / 2 for n in x), default=0.0)
    boxes = {}
    for n in view.nodes:
        boxes[n.id] = _Placed(x[n.id] - low + _MARGIN, rank[n.id] * (_NODE_H + _LAYER_GAP) + _MARGIN, n.width, _NODE_H)
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for edge, chain in chains.items():
        a, b = boxes[edge[0]], boxes[edge[1]]
        points = [(a.x, a.y + a.h)]
        for dummy in chain[1:-1]:
            cy = rank[dummy] * (_NODE_H + _LAYER_GAP) + _MARGIN
            points += [(x[dummy] - low + _MARGIN, cy), (x[dummy] - low + _MARGIN, cy + _NODE_H)]
        points.append((b.x, b.y))
        lines[edge] = points
    return boxes, lines, high - low + 2 * _MARGIN, len(layers) * (_NODE_H + _LAYER_GAP) - _LAYER_GAP + 2 * _MARGIN


def _path(points: Sequence[tuple[float, float]]) -> str:
    """Smooth vertical Béziers through the polyline's points."""
    d = [f"M{points[0][0]:.1f},{points[0][1]:.1f}"]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if abs(x0 - x1) < 0.5:
            d.append(f"L{x1:.1f},{y1:.1f}")
        else:
            my = (y0 + y1) / 2
            d.append(f"C{x0:.1f},{my:.1f} {x1:.1f},{my:.1f} {x1:.1f},{y1:.1f}")
    return " ".join(d)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _legend(view: GraphView, max_width: float) -> tuple[list[str], float, float]:
    """Legend items wrapped into rows no wider than ``max_width``; returns (parts, width, height)."""
    parts, x, y, width = [], _MARGIN, 10.0, 0.0
    for role in legend_roles(view):
        fill, stroke, text = STYLES[role]
        item_w = 20 + len(text) * CHAR_WIDTH + 22
        if x > _MARGIN and x + item_w > max_width:
            x, y = _MARGIN, y + 20
        dash = ' stroke-dasharray="5,3"' if role in ("collapsed", "ref") else ""
        parts.append(
            f'<g class="legend-item" data-role="{role}"><rect x="{x:.1f}" y="{y:.1f}" width="14" height="14" rx="3" '
            f'fill="{fill}" stroke="{stroke}"{dash}/><text x="{x + 20:.1f}" y="{y + 11:.1f}">{_esc(text)}</text></g>'
        )
        x += item_w
        width = max(width, x)
    return parts, width, y + 24


def render_svg_python(view: GraphView, title: str = "") -> str:
    """SVG from the built-in layout (no external tools)."""
    boxes, lines, width, height = _layout(view)
    legend, legend_w, top = _legend(view, max(width, 420.0))
    width = max(width, legend_w)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bc-graph" data-engine="python" '
        f'width="{width:.0f}" height="{height + top:.0f}" viewBox="0 0 {width:.0f} {height + top:.0f}" '
        f'font-family="{_FONT}" font-size="12" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<defs><marker id="{view.id_prefix}-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        '<g class="legend">',
        *legend,
        "</g>",
        f'<g transform="translate(0,{top})">',
    ]
    for name, members in view.clusters.items():
        placed = [boxes[m] for m in members]
        x0 = min(b.x - b.w / 2 for b in placed) - 8
        x1 = max(b.x + b.w / 2 for b in placed) + 8
        y0 = min(b.y for b in placed) - 18
        y1 = max(b.y + b.h for b in placed) + 8
        out.append(
            f'<g class="cluster" data-block="{_esc(name)}"><rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
            f'height="{y1 - y0:.1f}" rx="8" fill="#fafaff" stroke="#b9b3d6" stroke-dasharray="4,3"/>'
            f'<text x="{x0 + 6:.1f}" y="{y0 + 12:.1f}" fill="#5b3fa6" font-size="11">{_esc(name)}</text></g>'
        )
    for (src, dst), points in lines.items():
        out.append(
            f'<path class="edge" d="{_path(points)}" fill="none" stroke="#888" stroke-width="1.2" '
            f'marker-end="url(#{view.id_prefix}-arrow)"/>'
        )
    for n in view.nodes:
        b = boxes[n.id]
        fill, stroke, _ = STYLES.get(n.role, STYLES["plain"])
        dash = ' stroke-dasharray="5,3"' if n.role in ("collapsed", "ref") else ""
        rx = 17 if n.role in ("input", "output") else 5
        text_y = b.y + (15 if n.sublabel else 23)
        out.append(
            f'<g class="node" id="{_esc(n.id)}" data-role="{n.role}" data-layer="{_esc(n.layer)}">'
            f"<title>{_esc(n.title)}</title>"
            f'<rect x="{b.x - b.w / 2:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="{rx}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
            f'<text x="{b.x:.1f}" y="{text_y:.1f}" text-anchor="middle" font-weight="bold">{_esc(n.label)}</text>'
        )
        if n.sublabel:
            out.append(
                f'<text x="{b.x:.1f}" y="{b.y + 30:.1f}" text-anchor="middle" font-size="11" fill="#444">'
                f"{_esc(n.sublabel)}</text>"
            )
        out.append("</g>")
    out.append("</g></svg>")
    return "\n".join(out)
