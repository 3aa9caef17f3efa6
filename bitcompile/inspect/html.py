"""``report.to_html(dir)``: one self-contained page a person can read and look at.

Everything is inline (CSS, the SVG pictures, a few lines of script): the page makes no
network request, and its Content-Security-Policy forbids any, so it opens the same from a
CI artifact, an e-mail attachment or an air-gapped machine. Sections: totals, the legend,
the per-layer table, graphs and graph breaks, and per graph its picture and its code
before/after the rewrite with the rewritten and skipped lines highlighted.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable
from pathlib import Path
from bitcompile.inspect.records import INFERENCE_NOTE, SCHEMA_VERSION, GraphReport, ReportData, human_bytes, scale_groups
from bitcompile.inspect.render import STYLES, render_svg

#: Code listings longer than this start folded.
OPEN_CODE_LINES = 120

_ASSIGN = re.compile(r"^\s+([A-Za-z_]\w*) = ")

log = logging.getLogger(__name__)

#: Called with (graph index, error) when a graph's picture cannot be drawn; the page is written without it.
PictureErrorHandler = Callable[[int, Exception], None]

_CSS = """
:root { --ternary: %(ternary)s; --ternary-edge: %(ternary_edge)s; --skipped: %(skipped)s;
        --skipped-edge: %(skipped_edge)s; --plain: %(plain)s; --collapsed: %(collapsed)s; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d1d1f; background: #fbfbfd; }
header, main, footer { max-width: 1280px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; }
.config { color: #555; font-family: ui-monospace, monospace; font-size: 12.5px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 8px 14px; min-width: 150px; }
.card b { display: block; font-size: 20px; } .card span { color: #666; font-size: 12px; }
.legend { display: flex; flex-wrap: wrap; gap: 16px; padding: 0; list-style: none; }
.legend li { display: flex; align-items: center; gap: 6px; }
.swatch { width: 16px; height: 16px; border-radius: 4px; border: 1.5px solid; display: inline-block; }
table { border-collapse: collapse; width: 100%%; background: #fff; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f4; position: sticky; top: 0; }
.table-wrap { max-height: 65vh; overflow: auto; border: 1px solid #e4e4e4; border-radius: 6px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mono, .mono { font-family: ui-monospace, monospace; font-size: 12px; }
tr.rewritten td.decision { background: var(--ternary); color: var(--ternary-edge); font-weight: 600; }
tr.skipped td.decision { background: var(--skipped); color: var(--skipped-edge); font-weight: 600; }
tr.flash { outline: 3px solid #5b3fa6; }
details { background: #fff; border: 1px solid #ddd; border-radius: 8px; margin: 10px 0; padding: 6px 12px; }
summary { cursor: pointer; font-weight: 600; }
.picture { overflow: auto; max-height: 80vh; border: 1px solid #eee; border-radius: 6px; margin: 8px 0; background: #fff; }
.picture svg { display: block; max-width: 100%%; height: auto; }
.picture .node { cursor: pointer; }
pre.code { margin: 6px 0; overflow: auto; max-height: 70vh; font: 12px/1.5 ui-monospace, monospace; background: #fafafa;
           border: 1px solid #eee; border-radius: 6px; padding: 6px 0; counter-reset: line; }
pre.code span.line { display: block; padding: 0 10px 0 0; white-space: pre; }
pre.code span.line::before { counter-increment: line; content: counter(line); display: inline-block; width: 4em;
           margin-right: 10px; color: #aaa; text-align: right; }
pre.code span.rewritten { background: var(--ternary); }
pre.code span.replaced { background: #fde2e2; }
pre.code span.skipped { background: var(--skipped); }
.break { color: #a33; }
.picture-failed { border: 1px dashed #c46a00; background: #fff8ee; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
footer { color: #777; font-size: 12px; padding: 24px 20px; }
"""

_SCRIPT = """
document.querySelectorAll('.picture .node').forEach(function (node) {
  node.addEventListener('click', function () {
    var layer = node.getAttribute('data-layer');
    if (!layer) { return; }
    var row = document.querySelector('tr[data-layer="' + CSS.escape(layer) + '"]');
    if (!row) { return; }
    row.scrollIntoView({block: 'center'});
    row.classList.add('flash');
    setTimeout(function () { row.classList.remove('flash'); }, 1500);
  });
});
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _code(code: str, marks: dict[str, str], caption: str) -> str:
    lines = code.strip("\n").splitlines()
    out = []
    for line in lines:
        match = _ASSIGN.match(line)
        css = marks.get(match.group(1), "") if match else ""
        out.append(f'<span class="line {css}">{_e(line)}</span>' if css else f'<span class="line">{_e(line)}</span>')
    marked = sum(1 for line in lines if (m := _ASSIGN.match(line)) and m.group(1) in marks)
    state = " open" if len(lines) <= OPEN_CODE_LINES else ""
    return (
        f'<details class="code-block"{state}><summary>{_e(caption)}: {len(lines)} lines, {marked} highlighted</summary>'
        f'<pre class="code">{"".join(out)}</pre></details>'
    )


def picture_error_line(index: int, error: Exception) -> str:
    """The one line that says a picture is missing and why."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"the picture of graph {index} could not be drawn ({type(error).__name__}: {first}); the page has its tables and code"


def _log_picture_error(index: int, error: Exception) -> None:
    log.warning("%s", picture_error_line(index, error))


def _graph_section(
    report: ReportData, graph: GraphReport, engine: str, on_error: PictureErrorHandler
) -> tuple[str, str | None]:
    """HTML of one graph and its standalone SVG (None when the picture failed: a note stands in its place)."""
    try:
        svg, view = render_svg(graph, engine=engine, title=f"graph {graph.index}", id_prefix=f"g{graph.index}")
        picture = f'<div class="picture" data-graph="{graph.index}">{svg}</div>'
        drawn = f"{view.total_nodes} nodes drawn as {len(view.nodes)} boxes"
        drawn += f", {view.collapsed_blocks} repeated blocks collapsed" if view.collapsed_blocks else ""
    except Exception as error:  # a picture is never worth the report: note it, keep the rest
        on_error(graph.index, error)
        svg, drawn = None, f"{len(graph.nodes)} nodes, picture not drawn"
        picture = (
            f'<p class="picture-failed" data-graph="{graph.index}">The picture of this graph could not be drawn '
            f"({_e(type(error).__name__)}: {_e((str(error).strip().splitlines() or [''])[0])}). "
            "The layer table above and the code below are complete.</p>"
        )
    rewritten = sum(1 for layer in graph.layers if layer.rewritten)
    skipped = len(graph.layers) - rewritten
    before_marks = {name: "replaced" for name in graph.replaced}
    after_marks = {n.name: "rewritten" for n in graph.nodes if n.role in ("ternary", "inserted")}
    for layer in graph.layers:
        if not layer.rewritten and graph.layer_node(layer):
            before_marks[graph.layer_node(layer)] = after_marks[graph.layer_node(layer)] = "skipped"
    why = f' <span class="break">(graph break before it: {_e(graph.graph_break_reason)})</span>' if graph.graph_break_reason else ""
    body = (
        f'<details class="graph" id="graph-{graph.index}" open><summary>Graph {graph.index}: '
        f"{rewritten} layers rewritten, {skipped} kept float, {drawn}{why}</summary>"
        + picture
        + _code(graph.before, before_marks, "Code before the rewrite (red: replaced, orange: kept float)")
        + _code(graph.after, after_marks, "Code after the rewrite (green: ternary ops, orange: kept float)")
        + "</details>"
    )
    return body, svg


def _layer_rows(report: ReportData) -> str:
    rows = []
    for graph in report.graphs:
        for layer in graph.layers:
            css = "rewritten" if layer.rewritten else "skipped"
            sizes = (
                f"{human_bytes(layer.fp_bytes)} → {human_bytes(layer.packed_bytes)}"
                if layer.rewritten
                else human_bytes(layer.fp_bytes)
            )
            rows.append(
                f'<tr class="{css}" data-layer="{_e(layer.name)}"><td class="num">{graph.index}</td>'
                f'<td class="mono">{_e(layer.name)}</td><td class="num">{layer.out_features} × {layer.in_features}</td>'
                f'<td class="decision">{"ternary" if layer.rewritten else "kept float"}</td><td>{_e(layer.reason)}</td>'
                f'<td class="num">{_e(scale_groups(layer)) if layer.rewritten else "–"}</td>'
                f'<td class="num">{sizes}</td><td class="mono">{_e(" → ".join(graph.lowered_to(layer)) or "–")}</td></tr>'
            )
    return "".join(rows)


def render_html(
    report: ReportData,
    *,
    title: str = "bitcompile report",
    engine: str = "auto",
    on_picture_error: PictureErrorHandler | None = None,
) -> tuple[str, list[str | None]]:
    """The page's HTML and each graph's standalone SVG (None for a picture that could not be drawn).

    A picture that fails leaves a one-line note in its place; ``on_picture_error(index, error)``
    is told (default: a warning on this module's logger).
    """
    import bitcompile

    t = report.totals()
    ratio = f"{t['weight_memory_ratio']:.1f}×" if t["weight_memory_ratio"] else "n/a"
    sections: list[str] = []
    svgs: list[str | None] = []
    for graph in report.graphs:
        body, svg = _graph_section(report, graph, engine, on_picture_error or _log_picture_error)
        sections.append(body)
        svgs.append(svg)
    breaks = "".join(f'<li class="break">{_e(reason)}</li>' for reason in report.graph_break_reasons)
    options = ", ".join(f"{k}={v!r}" for k, v in report.config.to_options().items())
    legend = "".join(
        f'<li><span class="swatch" style="background:{STYLES[r][0]};border-color:{STYLES[r][1]}"></span>{_e(STYLES[r][2])}</li>'
        for r in ("ternary", "skipped", "plain", "input", "collapsed", "ref")
    )
    css = _CSS % {
        "ternary": STYLES["ternary"][0],
        "ternary_edge": STYLES["ternary"][1],
        "skipped": STYLES["skipped"][0],
        "skipped_edge": STYLES["skipped"][1],
        "plain": STYLES["plain"][0],
        "collapsed": STYLES["collapsed"][0],
    }
    cards = [
        (f"{t['rewritten']} / {t['layers']}", "layers rewritten to ternary"),
        (str(t["skipped"]), "candidate layers kept float"),
        (f"{t['rewritten_parameters']:,}", "ternary parameters"),
        (f"{human_bytes(t['rewritten_fp_bytes'])} → {human_bytes(t['rewritten_packed_bytes'])}", f"their weights ({ratio} smaller)"),
        (f"{human_bytes(t['weight_bytes_before'])} → {human_bytes(t['weight_bytes_after'])}", "all candidate layers"),
        (f"{report.graph_count} / {report.graph_break_count}", "graphs / graph breaks"),
    ]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{css}</style></head>
<body>
<header><h1>{_e(title)}</h1>
<p class="config">target {_e(report.config.target)} · kernels {_e(report.kernel)} · {_e(options)}</p></header>
<main>
<section id="totals"><div class="cards">{"".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in cards)}</div>
<p>{_e(INFERENCE_NOTE)}</p></section>
<section id="legend-section"><h2>Legend</h2><ul class="legend" id="legend">{legend}</ul></section>
<section id="layers"><h2>Layers</h2>
<div class="table-wrap"><table id="layer-table"><thead><tr><th>graph</th><th>layer</th><th>shape (out × in)</th><th>decision</th><th>reason</th>
<th>group size</th><th>weights fp → packed</th><th>lowered to</th></tr></thead>
<tbody>{_layer_rows(report) or '<tr><td colspan="8">No linear layers found: nothing was rewritten.</td></tr>'}</tbody></table></div></section>
<section id="graphs"><h2>Graphs and graph breaks</h2>
<p>{report.graph_count} graph(s), {report.graph_break_count} graph break(s).</p><ul>{breaks}</ul>
{"".join(sections)}</section>
</main>
<footer>bitcompile {_e(bitcompile.__version__)} · report schema version {SCHEMA_VERSION} · the same data as report.json</footer>
<script>{_SCRIPT}</script>
</body></html>
"""
    return page, svgs


def write_html(
    report: ReportData,
    directory: str | Path,
    *,
    title: str = "bitcompile report",
    engine: str = "auto",
    on_picture_error: PictureErrorHandler | None = None,
) -> Path:
    """Write ``index.html`` and ``graph_<i>.svg`` into ``directory``; returns the page's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    page, svgs = render_html(report, title=title, engine=engine, on_picture_error=on_picture_error)
    for i, svg in enumerate(svgs):
        path = out / f"graph_{i}.svg"
        if svg is not None:
            path.write_text(svg, encoding="utf-8")
        else:
            path.unlink(missing_ok=True)  # not a stale picture from an earlier run
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
