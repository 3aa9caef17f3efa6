"""Draw one rewritten graph as SVG: rewritten layers, skipped candidates and the rest told apart.

Two steps. :func:`build_view` turns the graph's nodes (``GraphReport.nodes``) into what is
worth drawing: parameters become part of the label of the layer that reads them, the
``getitem``/transpose helpers a rewrite inserts fold into their ternary op, a submodule's
plain ops fold into one box (an RMSNorm, an attention with its rotary embedding, an MoE's
expert dispatch), and runs of structurally identical blocks (``layers.1`` … ``layers.29`` of
a 30-layer model) collapse into one box after the first block, which stays expanded, so a
big model stays readable. Every fold keeps the picture acyclic (:class:`Folder`) and takes
graphs as transformers makes them: helpers before their op, inputs naming nodes that are
gone, ops of one module that are not contiguous.
:func:`render_svg` then lays the view out with graphviz ``dot`` when it is on PATH, or with
the small layered layout below (longest-path layers, dummy nodes on long edges, barycenter
ordering: the Sugiyama recipe) when it is not. Both produce the same node ids and colours.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from bitcompile.inspect.fold import Folder, Unit, fold_modules, link, toposort

if TYPE_CHECKING:
    from bitcompile.inspect.report import GraphReport
    from bitcompile.passes.describe import GraphNode

log = logging.getLogger(__name__)

#: role -> (fill, stroke, what the legend calls it)
STYLES = {
    "ternary": ("#c9efc9", "#1e7b3c", "rewritten to ternary"),
    "skipped": ("#ffe1b3", "#c46a00", "candidate kept float"),
    "plain": ("#f3f3f3", "#8c8c8c", "other op"),
    "input": ("#dbe8fb", "#2f5fa8", "graph input / output"),
    "output": ("#dbe8fb", "#2f5fa8", "graph input / output"),
    "inserted": ("#e6f7e6", "#1e7b3c", "helper added by the rewrite"),
    "collapsed": ("#ece4fa", "#5b3fa6", "repeated blocks, collapsed"),
    "ref": ("#ffffff", "#9a9a9a", "value drawn elsewhere (reference)"),
}
LEGEND_ROLES = ("ternary", "skipped", "plain", "input", "collapsed")

#: A run of at least this many identical blocks is collapsed (all but the first).
COLLAPSE_MIN_RUN = 3

_FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
_CHAR_W = 7.3  # px per character at 12px monospace
_NODE_H = 38.0
_LAYER_GAP = 30.0
_NODE_GAP = 18.0
_MARGIN = 16.0
_BLOCK = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclasses.dataclass
class ViewNode:
    """A box in the picture."""

    id: str
    role: str
    label: str
    sublabel: str
    title: str
    layer: str = ""
    cluster: str = ""

    @property
    def width(self) -> float:
        return max(len(self.label), len(self.sublabel), 6) * _CHAR_W + 18


@dataclasses.dataclass
class GraphView:
    """What :func:`render_svg` draws: boxes, edges between them, and expanded blocks as clusters."""

    nodes: list[ViewNode]
    edges: list[tuple[str, str]]
    clusters: dict[str, list[str]]
    collapsed_blocks: int = 0
    total_nodes: int = 0
    id_prefix: str = "n"


def _short(text: str, limit: int = 44) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _block_of(module: str) -> tuple[str, str, int] | None:
    """``layers.3.mlp`` → (``layers.3``, ``layers``, 3)."""
    match = _BLOCK.match(module)
    if match is None:
        return None
    return f"{match.group(1)}.{match.group(2)}", match.group(1), int(match.group(2))


def _relative(module: str, block: str) -> str:
    return module[len(block) :] if module == block or module.startswith(block + ".") else module


def build_view(graph: GraphReport, collapse_min: int = COLLAPSE_MIN_RUN, id_prefix: str = "n") -> GraphView:
    """The drawable form of one graph; see the module docstring for what is folded and collapsed."""
    nodes = [n for n in graph.nodes if n.role != "parameter"]
    by_name = {n.name: n for n in graph.nodes}
    reasons = {layer.name: layer.reason for layer in graph.layers}
    shapes = {layer.name: f"{layer.out_features}x{layer.in_features}" for layer in graph.layers}
    params = {n.name: n.target for n in graph.nodes if n.role == "parameter"}

    # 1. One box per node. Then a rewritten layer's ops and the helpers inserted with it share
    #    one (a helper may come before its op: GPT-2's weight.t()), then a submodule's plain ops
    #    do; each fold only when the picture stays acyclic.
    ops_of_layer: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        if n.role == "ternary" and n.layer and n.target not in ops_of_layer[n.layer]:
            ops_of_layer[n.layer].append(n.target)

    def title_of(n: GraphNode, members: Iterable[str]) -> str:
        if n.role == "ternary":
            title = f"{n.layer}: rewritten to {' → '.join(ops_of_layer.get(n.layer) or [n.target])}; {reasons.get(n.layer, '')}"
        elif n.role == "skipped":
            title = f"{n.layer}: kept float: {reasons.get(n.layer, '')}"
        elif n.role in ("input", "output"):
            title = f"{n.role} {n.target}"
        else:
            title = f"{n.name} = {n.target}(…)" + (f" in {n.module}" if n.module else "")
        weights = [params[a] for m in members for a in by_name[m].inputs if a in params]
        if weights:
            title += "; reads " + ", ".join(dict.fromkeys(weights))
        return title + (f"; shape {n.shape}" if n.shape else "")

    units: dict[str, Unit] = {}
    for pos, n in enumerate(nodes):
        if n.role == "ternary":
            label = " → ".join(op.split(".")[-1] for op in ops_of_layer.get(n.layer) or [n.target])
            sub = f"{n.layer}  {shapes.get(n.layer, '')}".strip()
        elif n.role == "skipped":
            label, sub = n.target, f"{n.layer}  {shapes.get(n.layer, '')}".strip()
        elif n.role in ("input", "output"):
            label, sub = n.role, n.target if n.role == "input" else ""
        else:
            label, sub = n.target, n.module or n.name
        units[n.name] = Unit(n.name, n.role, label, sub, title_of(n, [n.name]), n.module, n.layer, n.shape, [n.name], pos)
    alias = {n.name: n.name for n in nodes}
    link(units, alias, by_name)
    folder = Folder(units)
    of_layer: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        if n.role in ("ternary", "inserted") and n.layer:
            of_layer[n.layer].append(n.name)

    def make_layer(members: list[Unit]) -> Unit:
        head = next(m for m in members if m.role == "ternary")
        nested = [x for m in members for x in m.members]
        return dataclasses.replace(head, members=nested, title=title_of(by_name[head.name], nested))

    for names in of_layer.values():
        if len(names) > 1 and any(units[m].role == "ternary" for m in names):
            folded = folder.fold(names, make_layer)
            for x in folded.members if folded else ():
                alias[x] = folded.name
    fold_modules(folder, alias, by_name)
    # A call that neither reads nor feeds a value (torch._C._log_api_usage_once) has nothing to show.
    used = {a for u in units.values() for a in u.inputs}
    for name in [n for n, u in units.items() if u.role == "plain" and not u.inputs and n not in used]:
        del units[name]
    order = toposort(units)
    for pos, u in enumerate(order):
        u.pos = pos

    # 2. Blocks (``layers.3``) and their segments: block i runs up to the first box of block i+1.
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    info: dict[str, tuple[str, int]] = {}
    for i, u in enumerate(order):
        block = _block_of(u.module)
        if block is not None:
            first.setdefault(block[0], i)
            last[block[0]] = i
            info[block[0]] = (block[1], block[2])
    blocks = sorted(first, key=first.__getitem__)
    segments: dict[str, range] = {}
    for k, block in enumerate(blocks):
        nxt = blocks[k + 1] if k + 1 < len(blocks) else None
        follows = nxt is not None and info[nxt] == (info[block][0], info[block][1] + 1)
        segments[block] = range(first[block], first[nxt] if follows else last[block] + 1)

    def signature(block: str) -> tuple:
        names = [order[i].name for i in segments[block]]
        local = {name: j for j, name in enumerate(names)}
        return tuple(
            (
                u.role,
                u.label,
                _relative(u.module, block),
                _relative(u.layer, block),
                u.shape,
                tuple(local.get(a, "ext") for a in u.inputs),
            )
            for u in (units[name] for name in names)
        )

    # 3. A block identical to an earlier, expanded one is collapsed (when the pattern repeats
    #    at least ``collapse_min`` times); consecutive collapsed blocks share one box, also when
    #    they follow a pattern of several blocks (Gemma's sliding / full attention layers).
    signatures = {block: signature(block) for block in blocks}
    counts: dict[tuple, int] = defaultdict(int)
    for sig in signatures.values():
        counts[sig] += 1
    shown: dict[tuple, str] = {}
    runs: list[tuple[list[str], list[str]]] = []  # (likes, hidden blocks)
    for block in blocks:
        sig = signatures[block]
        if sig not in shown or counts[sig] < collapse_min:
            shown.setdefault(sig, block)
            continue
        like, prev = shown[sig], runs[-1][1][-1] if runs else None
        if prev is not None and info[prev] == (info[block][0], info[block][1] - 1):
            runs[-1][1].append(block)
            if like not in runs[-1][0]:
                runs[-1][0].append(like)
        else:
            runs.append(([like], [block]))
    box_of: dict[str, str] = {}  # unit name -> collapsed box id
    group_of: dict[str, str] = {}
    out_nodes: list[ViewNode] = []
    boxes: dict[str, ViewNode] = {}
    for k, (likes, hidden) in enumerate(runs):
        box = f"{id_prefix}-collapsed-{k}"
        members = [order[i] for b in hidden for i in segments[b]]
        ternary = sum(1 for m in members if m.role == "ternary")
        skipped = sum(1 for m in members if m.role == "skipped")
        label = f"{hidden[0]} … {hidden[-1]}" if len(hidden) > 1 else hidden[0]
        noun = "blocks" if len(hidden) > 1 else "block"
        like = ", ".join(likes)
        boxes[box] = ViewNode(
            box,
            "collapsed",
            label,
            f"{len(hidden)} {noun} like {like}: {ternary} ternary, {skipped} kept float",
            f"{len(hidden)} {noun} structurally identical to {' or '.join(likes)}, collapsed "
            f"({ternary} layers rewritten to ternary, {skipped} kept float)",
        )
        for m in members:
            box_of[m.name] = box

    # 4. Boxes, clusters, edges.
    ids: dict[str, str] = {}
    clusters: dict[str, list[str]] = defaultdict(list)
    for i, u in enumerate(order):
        if u.name in box_of:
            box = box_of[u.name]
            ids[u.name] = group_of[u.name] = box
            if boxes[box] not in out_nodes:
                out_nodes.append(boxes[box])
            continue
        node_id = f"{id_prefix}-{u.role}-{i}"
        ids[u.name] = node_id
        block = _block_of(u.module)
        cluster = block[0] if block and i in segments[block[0]] else ""
        out_nodes.append(ViewNode(node_id, u.role, _short(u.label), _short(u.sub), u.title, u.layer, cluster))
        group_of[u.name] = cluster
        if cluster:
            clusters[cluster].append(node_id)
    edges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    # A value used by many blocks (rotary tables) is drawn once; other blocks get a reference box.
    consumers: dict[str, list[str]] = defaultdict(list)
    for u in order:
        for a in u.inputs:
            g = group_of[u.name] or ids[u.name]
            if g not in consumers[a]:
                consumers[a].append(g)
    view_by_id = {n.id: n for n in out_nodes}
    refs: dict[tuple[str, str], str] = {}
    for u in order:
        dst = ids[u.name]
        for a in u.inputs:
            src = ids[a]
            groups = [g for g in consumers[a] if g != group_of[a]]
            group = group_of[u.name] or dst
            if len(groups) >= 3 and group != groups[0] and group != group_of[a]:
                key = (a, group)
                if key not in refs:
                    original = view_by_id[src]
                    ref = ViewNode(
                        f"{src}-ref-{len(refs)}",
                        "ref",
                        _short("↪ " + original.label),
                        original.sublabel,
                        f"the value of '{original.label} {original.sublabel}' (drawn once, where it is first used)",
                        cluster=group if group in clusters else "",
                    )
                    refs[key] = ref.id
                    out_nodes.insert(out_nodes.index(view_by_id[dst]), ref)
                    if ref.cluster:
                        clusters[ref.cluster].append(ref.id)
                src = refs[key]
            if src == dst or (src, dst) in seen:
                continue
            seen.add((src, dst))
            edges.append((src, dst))
    hidden_blocks = sum(len(h) for _, h in runs)
    return GraphView(out_nodes, edges, dict(clusters), hidden_blocks, len(graph.nodes), id_prefix)


# --------------------------------------------------------------------------------------
# Pure-Python layered layout


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


def legend_roles(view: GraphView) -> list[str]:
    """The roles a legend lists: the three kinds of op always, the others when present."""
    present = {n.role for n in view.nodes}
    return [r for r in (*LEGEND_ROLES, "ref") if r in ("ternary", "skipped", "plain") or r in present]


def _legend(view: GraphView, max_width: float) -> tuple[list[str], float, float]:
    """Legend items wrapped into rows no wider than ``max_width``; returns (parts, width, height)."""
    parts, x, y, width = [], _MARGIN, 10.0, 0.0
    for role in legend_roles(view):
        fill, stroke, text = STYLES[role]
        item_w = 20 + len(text) * _CHAR_W + 22
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


# --------------------------------------------------------------------------------------
# graphviz


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
        return f'{match.group(0)[:-1]} data-role="{n.role}" data-layer="{_esc(n.layer)}">'

    return re.sub(r'<g id="([^"]+)" class="node">', tag, svg)


def render_svg(graph: GraphReport, engine: str = "auto", title: str = "", id_prefix: str = "n") -> tuple[str, GraphView]:
    """Draw ``graph``; ``engine`` is ``"auto"`` (dot when present), ``"dot"`` or ``"python"``.

    Returns the SVG text (an ``<svg>`` element, ready to inline in HTML or save as a file)
    and the view that was drawn.
    """
    if engine not in ("auto", "dot", "python"):
        raise ValueError(f"engine={engine!r} is invalid: expected 'auto', 'dot' or 'python'")
    view = build_view(graph, id_prefix=id_prefix)
    if engine == "dot" or (engine == "auto" and shutil.which("dot")):
        try:
            return render_svg_dot(view, title), view
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            if engine == "dot":
                raise
            log.warning("graphviz failed (%s); using the built-in layout", error)
    return render_svg_python(view, title), view


def roles(view: GraphView) -> dict[str, int]:
    """How many boxes of each role the view has (for tests and summaries)."""
    counts: dict[str, int] = defaultdict(int)
    for n in view.nodes:
        counts[n.role] += 1
    return dict(counts)


__all__: Iterable[str] = ("GraphView", "ViewNode", "build_view", "render_svg", "render_svg_python", "render_svg_dot", "to_dot")
