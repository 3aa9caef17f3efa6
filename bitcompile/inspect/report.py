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
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bitcompile.backend import GraphNode, capture
from bitcompile.config import TernaryConfig
from bitcompile.passes.discover import LayerDecision

#: Version of :meth:`ExplainReport.to_json`'s layout. 2 added graph nodes, replaced nodes,
#: per-layer ``node`` / ``lowered_to`` and more totals; every version-1 field is unchanged.
SCHEMA_VERSION = 2

INFERENCE_NOTE = (
    "model.eval() + torch.no_grad() through the same compiled model runs the same ternary "
    "op (forward only), so inference also sees ternary weights."
)


def group_label(group_size: int | str) -> str:
    """``-1`` → ``"per row"``, ``"tensor"`` → ``"per tensor"``, ``128`` → ``"128"``."""
    if group_size == -1:
        return "per row"
    if group_size == "tensor":
        return "per tensor"
    return str(group_size)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass
class GraphReport:
    """One Dynamo graph: its layers and its code before/after the rewrite."""

    index: int
    compile_id: str
    graph_break_reason: str | None
    before: str
    after: str
    layers: list[LayerDecision]
    #: the graph after the rewrite, node by node (what the picture draws)
    nodes: list[GraphNode] = dataclasses.field(default_factory=list)
    #: before-rewrite node name -> layer name, for every node the rewrite replaced
    replaced: dict[str, str] = dataclasses.field(default_factory=dict)

    def lowered_to(self, layer: LayerDecision) -> list[str]:
        """The ops a rewritten layer became, in graph order (``[]`` for a layer kept float)."""
        if not layer.rewritten:
            return []
        # target="cann": the graph keeps bitcpm ops until after AOT, so the plan is what tells.
        if layer.lowering is not None and layer.lowering.kernels:
            return list(layer.lowering.kernels)
        return [n.target for n in self.nodes if n.layer == layer.name and n.role in ("ternary", "inserted")]

    def layer_node(self, layer: LayerDecision) -> str:
        """Name of the graph node (before the rewrite) that made this layer's call."""
        return layer.site.node.name if layer.site is not None else ""

    def to_json(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            row = layer.to_json()
            row["node"] = self.layer_node(layer)
            row["lowered_to"] = self.lowered_to(layer)
            layers.append(row)
        return {
            "index": self.index,
            "compile_id": self.compile_id,
            "graph_break_reason": self.graph_break_reason,
            "layers": layers,
            "code_before": self.before,
            "code_after": self.after,
            "nodes": [node.to_json() for node in self.nodes],
            "replaced_nodes": dict(self.replaced),
        }


@dataclasses.dataclass
class ExplainReport:
    """What ``bitcpm`` did to each layer of a model. ``str(report)`` is a readable table."""

    config: TernaryConfig
    kernel: str
    graphs: list[GraphReport]

    @property
    def layers(self) -> list[LayerDecision]:
        return [layer for graph in self.graphs for layer in graph.layers]

    @property
    def rewritten(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.rewritten]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if not layer.rewritten]

    @property
    def graph_count(self) -> int:
        return len(self.graphs)

    @property
    def graph_break_count(self) -> int:
        return max(len(self.graphs) - 1, 0)

    @property
    def graph_break_reasons(self) -> list[str]:
        return [g.graph_break_reason for g in self.graphs if g.graph_break_reason]

    @property
    def scale_mode(self) -> str:
        """How the weight scales are computed, and what that costs under DDP / FSDP2 (docs/distributed.md)."""
        if not self.rewritten:
            return "none (no layer rewritten)"
        if self.config.group_size == -1:
            return "per-row: local to each output row, no collective under DDP or FSDP2"
        if self.config.group_size != "tensor":
            return f"per-group ({self.config.group_size}): local to each group, no collective under DDP or FSDP2"
        if any(n.target == "bitcpm.ternary_linear_prescaled" for g in self.graphs for n in g.nodes):
            return (
                "per-tensor, precomputed: global absmean of the fp32 weights from "
                "bitcompile.distributed.precompute_tensor_scales (one batched all-reduce per step under FSDP2)"
            )
        return (
            "per-tensor, in forward: absmean of the weight the forward sees (the whole weight under DDP, "
            "the all-gathered one under FSDP2: global, no extra collective)"
        )

    def totals(self) -> dict[str, Any]:
        rewritten = self.rewritten
        fp = sum(layer.fp_bytes for layer in rewritten)
        packed = sum(layer.packed_bytes for layer in rewritten)
        # Over every candidate layer: the skipped ones keep their float bytes.
        before = sum(layer.fp_bytes for layer in self.layers)
        after = before - fp + packed
        return {
            "layers": len(self.layers),
            "rewritten": len(rewritten),
            "skipped": len(self.layers) - len(rewritten),
            "rewritten_parameters": sum(layer.out_features * layer.in_features for layer in rewritten),
            "rewritten_fp_bytes": fp,
            "rewritten_packed_bytes": packed,
            "weight_memory_ratio": (fp / packed) if packed else None,
            "parameters": sum(layer.out_features * layer.in_features for layer in self.layers),
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "overall_weight_memory_ratio": (before / after) if after else None,
        }

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (schema version :data:`SCHEMA_VERSION`, see docs/report_schema.md)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_options(),
            "kernel": self.kernel,
            "scale_mode": self.scale_mode,
            "graph_count": self.graph_count,
            "graph_break_count": self.graph_break_count,
            "graph_break_reasons": self.graph_break_reasons,
            "inference": INFERENCE_NOTE,
            "totals": self.totals(),
            "graphs": [g.to_json() for g in self.graphs],
        }

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
        """Print the per-layer table and totals to a rich console."""
        table = Table(title=f"bitcpm: {len(self.layers)} candidate layers in {self.graph_count} graph(s)")
        for column in ("graph", "layer", "shape (out x in)", "decision", "reason", "group size", "fp -> packed"):
            table.add_column(column, overflow="fold")
        for graph in self.graphs:
            for layer in graph.layers:
                sizes = (
                    f"{human_bytes(layer.fp_bytes)} -> {human_bytes(layer.packed_bytes)}" if layer.rewritten else "-"
                )
                table.add_row(
                    str(graph.index),
                    layer.name,
                    f"{layer.out_features} x {layer.in_features}",
                    "[green]ternary[/green]" if layer.rewritten else "[yellow]kept float[/yellow]",
                    layer.reason,
                    group_label(layer.group_size) if layer.rewritten else "-",
                    sizes,
                )
        if not self.layers:
            console.print("No linear layers found: nothing was rewritten.")
        else:
            console.print(table)
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
    config = TernaryConfig.from_options(options)
    records = capture(model, example_inputs, config)
    graphs = [
        GraphReport(i, r.compile_id, r.graph_break_reason, r.before, r.after, r.layers, r.nodes, r.replaced)
        for i, r in enumerate(records)
    ]
    kernel = records[0].kernel if records else "reference"
    return ExplainReport(config=config, kernel=kernel, graphs=graphs)
