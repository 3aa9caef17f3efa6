"""Find linear-like calls in a Dynamo graph and decide, per layer, whether to ternarize it.

Candidates are ``F.linear`` (``torch._C._nn.linear``) and ``matmul`` / ``mm`` / ``addmm``
/ ``@`` where one operand is a 2-D tensor from outside the graph (a parameter, or a
buffer that we then decline). Matmuls of two activations (attention scores) are not
layers and are not candidates. Each candidate gets a :class:`LayerDecision` with a reason
the user can act on; the rewrite pass only consumes decisions, never re-derives them.

The pass reads the graph only, so running it twice on one frame (Dynamo does under
``dynamic=True``) gives the same answer.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bitcompile.config import TernaryConfig
from bitcompile.kernels.groups import ScaleGroups, num_groups
from bitcompile.kernels.packing import packed_shape
from bitcompile.passes.names import attribute_value, calling_module, placeholder_path
from bitcompile.policy import layer_skip_reason

Layout = Literal["out_in", "in_out", "left"]
"""How the weight meets the activation: ``x @ W.T`` (nn.Linear), ``x @ W`` (Conv1D-style), ``W @ x``."""

_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, torch.ops.aten.mm.default, torch.ops.aten.matmul.default}
_ADDMM_FUNCTIONS = {torch.addmm, torch.ops.aten.addmm.default}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
_TRANSPOSE_METHODS = {"t"}
_TRANSPOSE_FUNCTIONS = {torch.t, torch.ops.aten.t.default}
_SWAP_METHODS = {"transpose", "permute"}
_SWAP_FUNCTIONS = {torch.transpose, torch.permute, torch.ops.aten.transpose.int, torch.ops.aten.permute.default}
_EMBEDDING_FUNCTIONS = {F.embedding, torch.ops.aten.embedding.default}
_TOPK = {torch.topk, torch.ops.aten.topk.default}
#: How many nodes may sit between a router's linear and its ``topk`` (``.float()``, softmax, ...).
_ROUTER_HOPS = 4
EMBEDDING_REASON = "embedding: float (lookup table; recipes keep it)"


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """Where a linear-like call sits in the graph and which argument is what."""

    node: torch.fx.Node
    kind: str  # "linear", "matmul" or "addmm"
    activation: torch.fx.Node
    weight: torch.fx.Node  # the node holding the stored tensor (placeholder / get_attr)
    bias: Any  # fx node, None, or (addmm) the added term
    layout: Layout
    #: the weight is matmul's left operand (``W @ x``, ``W.t() @ x``): a matrix ``x`` is
    #: transposed in and the result back out; a 1-D ``x`` needs neither (``W @ v == v @ W.T``)
    weight_first: bool = False


@dataclasses.dataclass(frozen=True)
class Lowering:
    """What a target's lowering pass made of one rewritten layer (``target="cann"``: its torch_npu plan).

    Set by the pass that decides it (:mod:`bitcompile.passes.lower_cann`); the explain report
    reads these fields, never the reason text.
    """

    target: str
    #: the target's kernels in call order (``("npu.npu_dynamic_quant", "npu.npu_quant_matmul")``);
    #: empty when the layer stays on bitcpm's own ops (``summary`` then says why)
    kernels: tuple[str, ...]
    #: one line for people: the plan (chip, kernels, weight dtype and layout) or why there is none
    summary: str


@dataclasses.dataclass
class LayerDecision:
    """One candidate layer and what the compiler did with it."""

    name: str
    weight_name: str
    kind: str
    layout: str
    out_features: int
    in_features: int
    dtype: str
    rewritten: bool
    #: why the layer was rewritten or kept float (the policy's or the graph's reason)
    rationale: str
    #: the layer's scale groups (per row for an int8 head)
    group_size: ScaleGroups
    fp_bytes: int
    packed_bytes: int
    site: LinearSite | None = dataclasses.field(default=None, repr=False, compare=False)
    #: set by the target's lowering pass (``target="cann"``); None on the other targets
    lowering: Lowering | None = None

    @property
    def reason(self) -> str:
        """:attr:`rationale`, then what the target's lowering made of the layer (``"...; Ascend A2: ..."``)."""
        return f"{self.rationale}; {self.lowering.summary}" if self.lowering is not None else self.rationale

    @property
    def group_code(self) -> int:
        """:attr:`group_size` as the ops encode it (:attr:`ScaleGroups.code`)."""
        return self.group_size.code

    def to_json(self) -> dict[str, Any]:
        """The report's per-layer fields (docs/report_schema.md); ``reason`` includes the lowering."""
        row: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name == "rationale":
                row["reason"] = self.reason
            elif field.name == "group_size":
                # docs/report_schema.md: the option's spelling; an int8 head's per-row scales are "row"
                row["group_size"] = "row" if self.kind == "int8" else self.group_size.option
            elif field.name not in ("site", "lowering"):
                row[field.name] = getattr(self, field.name)
        return row


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _stored_tensor(node: Any, example_by_placeholder: dict[torch.fx.Node, Any]) -> Any:
    """The real tensor behind a graph input / attribute, or None for activations and literals.

    A tensor the caller passed in (``model(x)``: source ``L['x']``) is an activation, not
    stored, unless it is an ``nn.Parameter`` (functional code handing parameters around).
    """
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "placeholder":
        tensor = example_by_placeholder.get(node)
        if _is_caller_input(node) and not isinstance(tensor, nn.Parameter):
            return None
        return tensor
    if node.op == "get_attr":
        return attribute_value(node)
    return None


def _is_caller_input(node: torch.fx.Node) -> bool:
    """A placeholder Dynamo filled from a frame argument itself (``L['x']``), not from an attribute of one."""
    from torch._dynamo.source import LocalSource

    return isinstance(getattr(node.meta.get("grapharg"), "source", None), LocalSource)


def _is_2d(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    return not isinstance(value, torch.Tensor) or value.dim() == 2  # unknown: the caller checks the stored tensor


def _swaps_two_dims(node: torch.fx.Node) -> bool:
    """``w.transpose(0, 1)`` / ``(-1, -2)`` / ``w.permute(1, 0)`` on a 2-D ``w``: the same as ``w.t()``."""
    dims = [*node.args[1:], *node.kwargs.values()]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])  # permute((1, 0))
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    is_permute = node.target in ("permute", torch.permute, torch.ops.aten.permute.default)
    normalized = [d % 2 for d in dims]
    return normalized == [1, 0] if is_permute else normalized[0] != normalized[1]


def _strip_transpose(node: Any) -> tuple[Any, bool]:
    """``w.t()``, ``w.T``, ``w.mT``, ``w.transpose(0, 1)``, ``w.permute(1, 0)`` → (w, True); else (node, False)."""
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return node, False
    inner = node.args[0]
    if len(node.args) == 1 and (
        (node.op == "call_method" and node.target in _TRANSPOSE_METHODS)
        or (node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS)
    ):
        return inner, True
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)) and _is_2d(inner):
        return inner, True
    swap = (node.op == "call_method" and node.target in _SWAP_METHODS) or (
        node.op == "call_function" and node.target in _SWAP_FUNCTIONS
    )
    if swap and _is_2d(inner) and _swaps_two_dims(node):
        return inner, True
    return node, False


def _is_linear_function(target: Any) -> bool:
    # bitcpm::float_gemv_linear is F.linear on another kernel (the fp32 head pack keeps)
    return target in _LINEAR_FUNCTIONS or str(target) in ("bitcpm.float_gemv_linear", "bitcpm.float_gemv_linear.default")


def _find_site(node: torch.fx.Node, stored: dict[torch.fx.Node, Any]) -> LinearSite | None:
    def is_stored_2d(n: Any) -> bool:
        t = _stored_tensor(_strip_transpose(n)[0], stored)
        return isinstance(t, torch.Tensor) and t.dim() == 2

    target = node.target
    if node.op == "call_function" and _is_linear_function(target):
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        inner, transposed = _strip_transpose(w)
        return LinearSite(node, "linear", x, inner, b, "in_out" if transposed else "out_in")
    is_matmul = (node.op == "call_function" and target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and target in _MATMUL_METHODS
    )
    if is_matmul and len(node.args) == 2:
        a, b = node.args
        if is_stored_2d(b):
            inner, transposed = _strip_transpose(b)
            return LinearSite(node, "matmul", a, inner, None, "out_in" if transposed else "in_out")
        if is_stored_2d(a) and not is_stored_2d(b):
            inner, transposed = _strip_transpose(a)
            return LinearSite(node, "matmul", b, inner, None, "in_out" if transposed else "left", weight_first=True)
        return None
    if node.op == "call_function" and target in _ADDMM_FUNCTIONS and len(node.args) >= 3:
        added, x, w = node.args[:3]
        if is_stored_2d(w):
            inner, transposed = _strip_transpose(w)
            return LinearSite(node, "addmm", x, inner, added, "out_in" if transposed else "in_out")
    return None


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _other_readers(site: LinearSite) -> list[torch.fx.Node]:
    """Nodes other than this call that read the weight (transposes feeding this call don't count)."""
    readers = []
    for user in site.weight.users:
        if user is site.node:
            continue
        if site.node in user.users and _strip_transpose(user)[0] is site.weight and len(user.users) == 1:
            continue
        readers.append(user)
    return readers


def _describe_reader(user: torch.fx.Node) -> str:
    where = calling_module(user)
    place = f" at {where[0]}" if where and where[0] else ""
    if user.op == "call_function" and user.target in _EMBEDDING_FUNCTIONS:
        return f"an embedding{place}"
    if user.target in _LINEAR_FUNCTIONS | _MATMUL_FUNCTIONS | _ADDMM_FUNCTIONS | _MATMUL_METHODS:
        return f"another linear layer{place}"
    name = getattr(user.target, "__name__", str(user.target))
    return f"{name}{place}"


def _layer_name(site: LinearSite, weight_path: str) -> str:
    module = calling_module(site.node)
    if module is None or not module[0]:
        return weight_path.removesuffix(".weight") if weight_path else site.node.name
    module_path = module[0]
    if weight_path.startswith(module_path + "."):
        return weight_path.removesuffix(".weight")  # the module's own (or a child's) weight
    return module_path  # the weight lives elsewhere: a tied or borrowed parameter


def feeds_topk(node: torch.fx.Node, hops: int = _ROUTER_HOPS) -> bool:
    """Whether ``node``'s output reaches a ``topk`` within ``hops`` nodes (an MoE router's logits)."""
    frontier = [node]
    for _ in range(hops):
        frontier = [user for n in frontier for user in n.users]
        if any(u.target in _TOPK or (u.op == "call_method" and u.target == "topk") for u in frontier):
            return True
    return False


def _skip_reason(
    site: LinearSite, weight: Any, weight_path: str, name: str, config: TernaryConfig
) -> str | None:
    """What only the graph can tell (parameter or not, who else reads it), then the shared policy."""
    if weight is None:
        return "weight is an activation computed in the graph, not a parameter"
    if not isinstance(weight, nn.Parameter):
        return "weight is a buffer or constant tensor, not an nn.Parameter"
    shared_with = None
    if readers := _other_readers(site):
        shared_with = ", ".join(sorted({_describe_reader(u) for u in readers}))
    elif weight_path and weight_path.removesuffix(".weight") != name:
        shared_with = f"parameter {weight_path} of another module (tied)"
    out_features, in_features = _out_in(weight.shape, site.layout) if weight.dim() == 2 else (0, 0)
    caller = calling_module(site.node)
    module_class = caller[1] if caller and weight_path == f"{caller[0]}.weight" else None  # its own weight
    routing = feeds_topk(site.node)
    if reason := layer_skip_reason(name, weight, out_features, in_features, config, shared_with, module_class, routing):
        return reason
    x = _val(site.activation)
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        return f"input dtype {x.dtype} is not floating point"
    if site.weight_first and not isinstance(x, torch.Tensor):
        # the rewrite must know whether x is a vector or a matrix (see LinearSite.weight_first)
        return "weight @ x where the rank of x is unknown (no example value in the graph)"
    if site.kind == "addmm" and (_arg(site.node, 3, "beta", 1) != 1 or _arg(site.node, 4, "alpha", 1) != 1):
        return "addmm with beta/alpha other than 1"
    return None


def _out_in(shape: Sequence[int], layout: Layout) -> tuple[int, int]:
    return (shape[0], shape[1]) if layout in ("out_in", "left") else (shape[1], shape[0])


def packed_nbytes(out_features: int, in_features: int, group_code: int) -> int:
    """Bytes of the 2-bit codes in the canonical layout (rows padded to a block) plus fp32 scales."""
    rows, row_bytes = packed_shape(out_features, in_features)
    return rows * row_bytes + 4 * out_features * num_groups(in_features, group_code)


def _stored_layer(node: torch.fx.Node, weight_node: Any, stored: dict[torch.fx.Node, Any], suffix: str, **fields) -> LayerDecision:
    """The decision record of a layer a model already stores in packed form (no rewrite)."""
    weight = _stored_tensor(weight_node, stored)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else (0, 0)
    module = calling_module(node)
    path = placeholder_path(weight_node) if isinstance(weight_node, torch.fx.Node) else None
    return LayerDecision(
        name=module[0] if module else (path or node.name).removesuffix(suffix),
        weight_name=path or str(weight_node),
        layout="out_in",
        out_features=shape[0],
        fp_bytes=0,
        **fields,
    )


def _already_packed(node: torch.fx.Node, stored: dict[torch.fx.Node, Any]) -> LayerDecision | None:
    """A ``PackedTernaryLinear`` call (a model that ``pack`` already converted)."""
    packed_op = torch.ops.bitcpm.ternary_linear_packed
    if node.op != "call_function" or node.target not in (packed_op, packed_op.default):
        return None
    packed_node, in_features, group_code = node.args[1], node.args[4], node.args[5]
    packed = _stored_tensor(packed_node, stored)
    out_features = packed.shape[0] if isinstance(packed, torch.Tensor) else 0
    return _stored_layer(
        node, packed_node, stored, ".packed", kind="packed", in_features=in_features, dtype="2-bit", rewritten=True,
        rationale=f"already packed: 2-bit ternary weights ({ScaleGroups.from_code(group_code).label} scales)",
        group_size=ScaleGroups.from_code(group_code),
        packed_bytes=packed_nbytes(out_features, in_features, group_code),
    )  # fmt: skip


def _int8_head(node: torch.fx.Node, stored: dict[torch.fx.Node, Any]) -> LayerDecision | None:
    """An ``Int8Linear`` call (``pack(head="int8")``): kept out of ternary, stored as int8."""
    if node.op != "call_function" or str(node.target) not in ("bitcpm.int8_dense_linear", "bitcpm.int8_dense_linear.default"):
        return None
    codes = _stored_tensor(node.args[1], stored)
    out_features, in_features = tuple(codes.shape) if isinstance(codes, torch.Tensor) else (0, 0)
    return _stored_layer(
        node, node.args[1], stored, ".codes", kind="int8", in_features=in_features, dtype="int8", rewritten=False,
        rationale="int8 head (W8A8, pack(head='int8')): per-row int8 weights, not ternary",
        group_size=ScaleGroups.per_row(), packed_bytes=out_features * in_features + 4 * out_features,
    )  # fmt: skip


def _embedding(node: torch.fx.Node, stored: dict[torch.fx.Node, Any], config: TernaryConfig) -> LayerDecision | None:
    """An ``F.embedding`` of a stored weight: listed (kept float) so the report says why."""
    if node.op != "call_function" or node.target not in _EMBEDDING_FUNCTIONS:
        return None
    weight_node = _arg(node, 1, "weight")
    weight = _stored_tensor(weight_node, stored)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    path = placeholder_path(weight_node) if weight_node.op == "placeholder" else str(weight_node.target)
    module = calling_module(node)
    rows, dim = weight.shape
    return LayerDecision(
        name=module[0] if module and module[0] else (path or node.name).removesuffix(".weight"),
        weight_name=path or weight_node.name, kind="embedding", layout="out_in", out_features=rows,
        in_features=dim, dtype=str(weight.dtype).removeprefix("torch."), rewritten=False,
        rationale=EMBEDDING_REASON, group_size=config.group_size,
        fp_bytes=weight.numel() * weight.element_size(), packed_bytes=0,
    )  # fmt: skip


def discover(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: TernaryConfig) -> list[LayerDecision]:
    """Every linear-like candidate in ``gm`` with its decision, in graph order, then its MoE expert groups.

    Embedding lookups are listed too (kind ``"embedding"``, always kept float, with the reason).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    stored = dict(zip(placeholders, example_inputs))
    decisions = []
    for node in gm.graph.nodes:
        if (packed := _already_packed(node, stored) or _int8_head(node, stored)) is not None:
            decisions.append(packed)
            continue
        if (embedding := _embedding(node, stored, config)) is not None:
            decisions.append(embedding)
            continue
        site = _find_site(node, stored)
        if site is None:
            continue
        weight = _stored_tensor(site.weight, stored)
        weight_path = (placeholder_path(site.weight) if site.weight.op == "placeholder" else str(site.weight.target)) or ""
        name = _layer_name(site, weight_path)
        reason = _skip_reason(site, weight, weight_path, name, config)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else (0, 0)
        out_features, in_features = _out_in(shape, site.layout)
        itemsize = weight.element_size() if isinstance(weight, torch.Tensor) else 0
        mode = config.group_size.label
        acts = "int8 activations" if config.quantize_activations else "weight-only"
        decisions.append(
            LayerDecision(
                name=name,
                weight_name=weight_path or site.weight.name,
                kind=site.kind,
                layout=site.layout,
                out_features=out_features,
                in_features=in_features,
                dtype=str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else "activation",
                rewritten=reason is None,
                rationale=reason or f"ternary weights ({mode} scales), {acts}",
                group_size=config.group_size,
                fp_bytes=out_features * in_features * itemsize,
                packed_bytes=packed_nbytes(out_features, in_features, config.group_code) if reason is None else 0,
                site=site,
            )
        )
    from bitcompile.passes.experts import discover_experts  # 3-D MoE expert weights (it imports LayerDecision)

    decisions.extend(discover_experts(gm, stored, config))
    return decisions
