"""Draw one rewritten graph as SVG: rewritten layers, skipped candidates and the rest told apart.

Two steps. :func:`~bitcompile.inspect.view.build_view` turns the graph's nodes
(``GraphReport.nodes``) into what is worth drawing (:mod:`bitcompile.inspect.view`).
:func:`render_svg` then lays the view out with graphviz ``dot`` when it is on PATH
(:mod:`bitcompile.inspect.dot`), or with the small layered layout (:mod:`bitcompile.inspect.layered_svg`)
when it is not. Both produce the same node ids and colours.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import TYPE_CHECKING

from bitcompile.inspect.dot import render_svg_dot, to_dot
from bitcompile.inspect.layered_svg import render_svg_python
from bitcompile.inspect.view import COLLAPSE_MIN_RUN, LEGEND_ROLES, STYLES, GraphView, ViewNode, build_view, legend_roles, roles

if TYPE_CHECKING:
    from bitcompile.inspect.records import GraphReport

log = logging.getLogger(__name__)

# The drawing's pieces, importable from here as before the split.
__all__ = [
    "COLLAPSE_MIN_RUN", "LEGEND_ROLES", "STYLES", "GraphView", "ViewNode", "build_view", "legend_roles", "render_svg",
    "render_svg_dot", "render_svg_python", "roles", "to_dot",
]  # fmt: skip


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
