"""The explain report's data: one record per graph, the sums over them, and their JSON form.

Everything that shows a report (the text table in :mod:`bitcompile.inspect.report`, the page
in :mod:`bitcompile.inspect.html`, the pictures in :mod:`bitcompile.inspect.render`) reads
these records; none of them is imported here, so the presenters sit above their data.
A graph's facts are the backend's own :class:`~bitcompile.backend.CompiledGraph`, held as is.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from bitcompile.config import TernaryConfig

if TYPE_CHECKING:
    from bitcompile.backend import CompiledGraph
    from bitcompile.passes.describe import GraphNode
    from bitcompile.passes.discover import LayerDecision

#: Version of the report's JSON layout (docs/report_schema.md). 2 added graph nodes, replaced
#: nodes, per-layer ``node`` / ``lowered_to`` and more totals; every version-1 field is unchanged.
SCHEMA_VERSION = 2

INFERENCE_NOTE = (
    "model.eval() + torch.no_grad() through the same compiled model runs the same ternary "
    "op (forward only), so inference also sees ternary weights."
)


def scale_groups(layer: LayerDecision) -> str:
    """How a rewritten layer's weight scales are grouped, spelled as everywhere else (``"per-row"``)."""
    return layer.group_size.label


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _parameters(layer: LayerDecision) -> int:
    """Weights of one report row: an expert group (``num_experts``) counts every expert."""
    return max(getattr(layer, "num_experts", 0), 1) * layer.out_features * layer.in_features


@dataclasses.dataclass
class GraphReport:
    """One Dynamo graph of the report: the backend's record of it and its position among the graphs."""

    index: int
    record: CompiledGraph

    @property
    def compile_id(self) -> str:
        return self.record.compile_id

    @property
    def graph_break_reason(self) -> str | None:
        return self.record.graph_break_reason

    @property
    def before(self) -> str:
        """The graph's code before the rewrite."""
        return self.record.before

    @property
    def after(self) -> str:
        """The graph's code after the rewrite (and, for ``target="cann"``, after the lowering)."""
        return self.record.after

    @property
    def layers(self) -> list[LayerDecision]:
        return self.record.layers

    @property
    def nodes(self) -> list[GraphNode]:
        """The graph after the rewrite, node by node (what the picture draws)."""
        return self.record.nodes

    @property
    def replaced(self) -> dict[str, str]:
        """Before-rewrite node name -> layer name, for every node the rewrite replaced."""
        return self.record.replaced

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
        if layer.site is None:  # an MoE expert group: its first call
            sites = getattr(layer, "sites", ())
            return sites[0].node.name if sites else ""
        return layer.site.node.name

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
class ReportData:
    """What ``bitcpm`` did to each layer of a model, and the sums over it.

    :class:`~bitcompile.inspect.report.ExplainReport` adds the ways to show it (text, files, HTML).
    """

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
        groups = self.config.group_size
        if groups.kind == "row":
            return "per-row: local to each output row, no collective under DDP or FSDP2"
        if groups.kind == "group":
            return f"per-group ({groups.size}): local to each group, no collective under DDP or FSDP2"
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
            "rewritten_parameters": sum(_parameters(layer) for layer in rewritten),
            "rewritten_fp_bytes": fp,
            "rewritten_packed_bytes": packed,
            "weight_memory_ratio": (fp / packed) if packed else None,
            "parameters": sum(_parameters(layer) for layer in self.layers),
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
