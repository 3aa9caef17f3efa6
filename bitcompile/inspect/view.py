"""What a graph's picture shows: :func:`build_view` turns a report graph into boxes and edges.

Parameters become part of the label of the layer that reads them, the ``getitem``/transpose
helpers a rewrite inserts fold into their ternary op, a submodule's plain ops fold into one
box (an RMSNorm, an attention with its rotary embedding, an MoE's expert dispatch), and runs
of structurally identical blocks (``layers.1`` … ``layers.29`` of a 30-layer model) collapse
into one box after the first block, which stays expanded, so a big model stays readable.
Every fold keeps the picture acyclic (:class:`~bitcompile.inspect.fold.Folder`) and takes
graphs as transformers makes them: helpers before their op, inputs naming nodes that are
gone, ops of one module that are not contiguous. Both layouts (:mod:`bitcompile.inspect.layered_svg`,
:mod:`bitcompile.inspect.dot`) draw the same view, with the colours of :data:`STYLES`.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bitcompile.inspect.fold import Folder, Unit, fold_modules, link, toposort

if TYPE_CHECKING:
    from bitcompile.inspect.records import GraphReport
    from bitcompile.passes.describe import GraphNode

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

#: px per character at 12px monospace (box and legend widths)
CHAR_WIDTH = 7.3
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
        return max(len(self.label), len(self.sublabel), 6) * CHAR_WIDTH + 18


@dataclasses.dataclass
class GraphView:
    """What :func:`~bitcompile.inspect.render.render_svg` draws: boxes, edges between them, and expanded blocks as clusters."""

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


def legend_roles(view: GraphView) -> list[str]:
    """The roles a legend lists: the three kinds of op always, the others when present."""
    present = {n.role for n in view.nodes}
    return [r for r in (*LEGEND_ROLES, "ref") if r in ("ternary", "skipped", "plain") or r in present]


def roles(view: GraphView) -> dict[str, int]:
    """How many boxes of each role the view has (for tests and summaries)."""
    counts: dict[str, int] = defaultdict(int)
    for n in view.nodes:
        counts[n.role] += 1
    return dict(counts)

