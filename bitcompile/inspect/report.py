"""``bitcompile.explain``: what the compiler would do to a model, without training it.

The report has one row per candidate layer per graph, totals, the graphs and graph breaks
Dynamo produced, and each graph's code before and after the rewrite.
``report.to_json()`` follows the versioned schema documented in docs/report_schema.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitcompile.config import TernaryConfig
from bitcompile.inspect.records import (
    INFERENCE_NOTE,
    SCHEMA_VERSION,
    GraphReport,
    ReportData,
    human_bytes,
)

if TYPE_CHECKING:
    import torch
    from rich.console import Console

__all__ = ["INFERENCE_NOTE", "SCHEMA_VERSION", "ExplainReport", "GraphReport", "explain", "human_bytes"]


@dataclasses.dataclass
class ExplainReport(ReportData):
    """What ``bitcpm`` did to each layer of a model. ``str(report)`` is a readable table.

    The data and its JSON form are :class:`~bitcompile.inspect.records.ReportData`'s; this
    class adds the ways to show them: a rich table, files, an HTML page.
    """

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json``, ``report.txt`` and each graph's code before/after into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_json(), indent=2))
        (out / "report.txt").write_text(str(self))
        for graph in self.graphs:
            (out / f"graph_{graph.index}_before.py").write_text(graph.before)
            (out / f"graph_{graph.index}_after.py").write_text(graph.after)
        return out

    def to_html(
        self,
        directory: str | Path,
        *,
        title: str = "bitcompile report",
        engine: str = "auto",
        on_picture_error: Callable[[int, Exception], None] | None = None,
    ) -> Path:
        """Write a self-contained ``index.html`` (tables, code before/after, one SVG per graph).

        ``engine`` picks the graph layout: ``"dot"`` (graphviz), ``"python"`` (built in) or
        ``"auto"`` (graphviz when ``dot`` is on PATH). A graph whose picture cannot be drawn
        gets a one-line note instead and ``on_picture_error(graph_index, error)`` is called
        (default: a logged warning); the page is written all the same. Returns its path.
        """
        from bitcompile.inspect.html import write_html

        return write_html(self, directory, title=title, engine=engine, on_picture_error=on_picture_error)

    def render(self, console: Console) -> None:
        """Print the per-layer table and totals to a rich console.

        Reasons (which say the scale groups) are numbered notes under the table (most rows share one), so a row stays at
        most two lines on an 80-column terminal; the graph column appears only for several graphs.
        """
        from rich.table import Table

        table = Table(title=f"bitcpm: {len(self.layers)} candidate layers in {self.graph_count} graph(s)")
        several_graphs = self.graph_count > 1
        columns = (("graph",) if several_graphs else ()) + ("layer", "shape", "decision", "why", "fp -> packed")
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column != "layer")
        notes: dict[str, int] = {}
        for graph in self.graphs:
            for layer in graph.layers:
                sizes = (
                    f"{human_bytes(layer.fp_bytes)} -> {human_bytes(layer.packed_bytes)}" if layer.rewritten else "-"
                )
                note = notes.setdefault(layer.reason, len(notes) + 1)
                table.add_row(
                    *((str(graph.index),) if several_graphs else ()),
                    layer.name,
                    f"{layer.out_features}x{layer.in_features}",
                    "[green]ternary[/green]" if layer.rewritten else "[yellow]float[/yellow]",
                    f"({note})",
                    sizes,
                )
        if not self.layers:
            console.print("No linear layers found: nothing was rewritten.")
        else:
            console.print(table)
            for reason, note in notes.items():
                console.print(f"({note}) {reason}", highlight=False)
        t = self.totals()
        ratio = f"{t['weight_memory_ratio']:.1f}x smaller" if t["weight_memory_ratio"] else "n/a"
        console.print(
            f"rewritten {t['rewritten']} / skipped {t['skipped']} layers; "
            f"{t['rewritten_parameters']:,} ternary parameters; weights "
            f"{human_bytes(t['rewritten_fp_bytes'])} -> {human_bytes(t['rewritten_packed_bytes'])} ({ratio})"
        )
        if t["skipped"] and t["overall_weight_memory_ratio"]:
            console.print(
                f"all {t['layers']} candidate layers ({t['parameters']:,} parameters): "
                f"{human_bytes(t['weight_bytes_before'])} -> {human_bytes(t['weight_bytes_after'])} "
                f"({t['overall_weight_memory_ratio']:.1f}x smaller)"
            )
        console.print(f"scales: {self.scale_mode}")
        console.print(f"graphs: {self.graph_count}, graph breaks: {self.graph_break_count}")
        for reason in self.graph_break_reasons:
            console.print(f"  break: {reason}")
        console.print(f"kernels: {self.kernel}; {INFERENCE_NOTE}")

    def render_lowering(self, console: Console) -> None:
        """Print, per rewritten layer, the op sequence it was lowered to (``--target cann``)."""
        from rich.table import Table

        table = Table(title=f"lowering for target {self.config.target!r} (kernels: {self.kernel})")
        table.add_column("graph")
        table.add_column("layer", overflow="fold")
        table.add_column("ops, in order", overflow="fold")
        for graph in self.graphs:
            for layer in graph.layers:
                if layer.rewritten:
                    table.add_row(str(graph.index), layer.name, " -> ".join(graph.lowered_to(layer)) or "-")
        console.print(table)

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        self.render(Console(file=buffer, width=140, force_terminal=False, color_system=None))
        return buffer.getvalue()


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Capture ``model`` with Dynamo, run the bitcpm passes, and report what they decided.

    ``options`` are the same as ``torch.compile(..., options=...)`` (``group_size=128``,
    ``exclude=["lm_head"]`` ...). Nothing is trained and the model is not changed. Like
    ``torch._dynamo.explain``, this resets Dynamo's caches before and after capturing, so
    already-compiled models recompile on their next call.
    """
    from bitcompile.backend import capture  # Dynamo: only when a model is explained

    config = TernaryConfig.from_options(options)
    records = capture(model, example_inputs, config)
    from bitcompile.passes.experts import warn_experts_outside_graphs

    warn_experts_outside_graphs(model, [d for r in records for d in r.layers])  # MoE experts Dynamo never saw
    # The report keeps what it shows; the graph module and example inputs would keep packed copies alive.
    graphs = [
        GraphReport(i, dataclasses.replace(r, graph_module=None, example_inputs=())) for i, r in enumerate(records)
    ]
    kernel = records[0].kernel if records else "reference"
    return ExplainReport(config=config, kernel=kernel, graphs=graphs)
