"""Lower ``bitcpm`` ops to torch_npu kernels for ``target="cann"`` (DESIGN.md §5).

Three passes, run by :class:`CannLowering` (the cann target's lowering, :mod:`bitcompile.targets`):

1. :func:`plan_cann_layers` (Dynamo graph, right after ``ternary_rewrite``): for every
   ``bitcpm::ternary_linear`` node, check the layer against the device constraints (K and N
   <= 65535, an fp16/bf16/fp32 model, group sizes a multiple of 32). Layers that fit get
   ``kernel="cann"``; the others stay on bitcpm's pure-PyTorch ternary kernels (the float
   path) with the reason written into their :class:`LayerDecision`, so the explain report
   says why.
2. :func:`lower_to_cann` (post-AOT forward or inference graph): replace each
   ``bitcpm.ternary_linear(..., "cann")`` node by the torch_npu node sequence. The
   backward graph keeps bitcpm's fused STE op: the npu ops have no autograd, and AOTAutograd
   has already taken the backward from the bitcpm op's own formula.

W1.58A8, per-row or per-tensor weight scales::

    x (B, S, K) ──view──▶ (M, K) ──[bf16 cast if fp32]──▶ npu_dynamic_quant ──▶ q_x int8 (M, K), s_x (M,)
    W (N, K) ──ternary quantize──▶ q_w int8 (N, K), s_w (N, 1) ──t()──▶ (K, N) view
    npu_quant_matmul(q_x, q_w (K, N), s_w (N,), pertoken_scale=s_x, bias, output_dtype=bf16)
        ──▶ (M, N) ──[cast to the model dtype]──view──▶ (B, S, N)

Per-group scales (g a multiple of 32) or weight-only::

    x ──view──▶ (M, K) ──[npu_dynamic_quant, q_x * s_x when activations are int8]──▶ bf16/fp16
    npu_weight_quant_batchmatmul(x, q_w (K, N), antiquant_scale (ceil(K/g), N), bias,
                                 antiquant_group_size=g) ──▶ (M, N) ──view──▶ (B, S, N)

Training graphs quantize the weight in the graph (it changes every step). Packed inference
(a model converted by ``pack``, or ``freeze=True``) never unpacks the 2-bit codes inside the
graph:

3. :func:`prepare_packed_layers` (Dynamo graph, before the plan) builds the Ascend weights of each
   ``bitcpm::ternary_linear_packed`` node once, at compile time (int8 ``(K, N)`` copies, int4
   packing, ``npu_format_cast(w, 29)`` on hardware), registers them as buffers of the graph
   module and replaces the node by :func:`cann_prepared_linear` on them, which AOTAutograd
   traces into the same ``npu.*`` sequences as above, with the weight a constant. The packed
   buffers the weights came from are watched by :class:`~bitcompile.passes.freeze_pack.FrozenWeightGuard`:
   changing them after compilation raises instead of serving the stale prepared weights.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from bitcompile.config import TernaryConfig
from bitcompile.ops.training import ternary_forward
from bitcompile.passes.discover import LayerDecision, Lowering
from bitcompile.passes.freeze_pack import FrozenParameter, frozen_parameter
from bitcompile.passes.names import calling_module
from bitcompile.targets import get_kernel, on_npu

log = logging.getLogger(__name__)

_TERNARY_LINEAR = torch.ops.bitcpm.ternary_linear.default
_TRANSPOSES = (torch.t, torch.ops.aten.t.default)


def _val(node: Any) -> Any:
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else None


def _weight_source(node: Any) -> Any:
    """The parameter node behind a (possibly transposed) weight argument."""
    if isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") and node.target in (
        *_TRANSPOSES,
        "t",
    ):
        return node.args[0]
    return node


def describe_lowering(plan: Any, group_code: int) -> str:
    """The torch_npu sequence of a :class:`~bitcompile.kernels.cann_plan.LayerPlan`, as the explain report prints it."""
    text = plan.describe()
    if plan.path == "weight_quant_batchmatmul":
        text += f", antiquant_group_size={group_code}" if group_code > 0 else ", per-channel scales"
    return text


def plan_kernels(plan: Any) -> tuple[str, ...]:
    """The kernels of a :class:`~bitcompile.kernels.cann_plan.LayerPlan` in call order, as the explain report lists them."""
    quantize = {"npu_dynamic_quant": ("npu.npu_dynamic_quant",), "aten": ("aten int8 quantization",), None: ()}
    return (*quantize[plan.activation_quant], f"npu.npu_{plan.path}")


def plan_cann_layers(gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision], chip: str = "A2") -> int:
    """Route each ``bitcpm::ternary_linear`` node to kernel ``"cann"`` or back to ``"reference"``.

    Training graphs quantize the weight in the graph, so their plan is int8 ND on ``chip``.
    Returns the number of layers that will run on torch_npu kernels.
    """
    cann = get_kernel("cann")
    by_weight = {d.site.weight: d for d in decisions if d.rewritten and d.site is not None}
    lowered = 0
    for node in gm.graph.find_nodes(op="call_function", target=_TERNARY_LINEAR):
        x, weight, _bias, group_code, quantize_activations, kernel = node.args
        if kernel != "cann":
            continue
        x_val, w_val = _val(x), _val(weight)
        decision = by_weight.get(_weight_source(weight))
        if not isinstance(x_val, torch.Tensor) or not isinstance(w_val, torch.Tensor):
            reason = "shapes unknown at compile time"
        else:
            n, k = w_val.shape
            plan = cann.layer_plan(k, n, group_code, quantize_activations, x_val.dtype, chip)
            reason = plan if isinstance(plan, str) else None
        if reason is None:
            lowered += 1
            note, kernels = describe_lowering(plan, group_code), plan_kernels(plan)
        else:
            node.args = (*node.args[:5], "reference")
            note, kernels = f"kept on the float path (bitcpm reference kernels): {reason}", ()
        if decision is not None:
            decision.lowering = Lowering("cann", kernels, note)
        log.debug("bitcpm cann plan: %s -> %s", decision.name if decision else node.name, note)
    gm.recompile()
    return lowered


class _ChipKernels:
    """The cann kernels with ``chip`` bound: the shape :func:`~bitcompile.ops.training.ternary_forward` calls."""

    def __init__(self, chip: str) -> None:
        self.cann, self.chip = get_kernel("cann"), chip

    def quantize_activations(self, x2d: torch.Tensor):
        return self.cann.quantize_activations(x2d, self.chip)

    def int8_ternary_matmul(self, *args):
        return self.cann.int8_ternary_matmul(*args, self.chip)

    def float_ternary_matmul(self, *args):
        return self.cann.float_ternary_matmul(*args, self.chip)


def _training_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_code: int, quantize_activations: bool,
    chip: str,
):  # fmt: skip
    """``bitcpm::ternary_linear``'s five outputs computed with the cann kernels (traced into the graph)."""
    kernels = _ChipKernels(chip)
    w_codes, w_scales = kernels.cann.quantize_weight(weight, group_code)
    return ternary_forward(kernels, x, w_codes, w_scales, group_code, bias, quantize_activations)


def _inline(
    graph: torch.fx.Graph, before: torch.fx.Node, fn: Callable, inputs: Sequence[torch.fx.Node], decompositions
) -> Any:
    """Trace ``fn`` on the fake values of ``inputs`` and copy its aten/npu nodes in front of ``before``."""
    vals = [_val(n) for n in inputs]
    fake_mode = detect_fake_mode(vals)
    assert fake_mode is not None, "lower_to_cann runs on graphs whose nodes carry fake values"
    with fake_mode:
        sub = make_fx(fn, decomposition_table=decompositions)(*vals)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, inputs))
    with graph.inserting_before(before):
        return graph.graph_copy(sub.graph, env)


def lower_to_cann(gm: torch.fx.GraphModule, decompositions: dict | None = None, chip: str = "A2") -> int:
    """Replace ``bitcpm.ternary_linear(..., "cann")`` nodes by torch_npu sequences; returns how many.

    ``decompositions`` is applied to the inserted aten ops (inductor needs its own table applied).
    """
    graph = gm.graph
    count = 0
    for node in list(graph.find_nodes(op="call_function", target=_TERNARY_LINEAR)):
        x, weight, bias, group_code, quantize_activations, kernel = node.args
        if kernel != "cann":
            continue
        inputs = [x, weight] + ([bias] if bias is not None else [])

        def fn(*tensors, _g=group_code, _q=quantize_activations, _b=bias is not None):
            return _training_forward(tensors[0], tensors[1], tensors[2] if _b else None, _g, _q, chip)

        outputs = _inline(graph, node, fn, inputs, decompositions)
        for user in list(node.users):
            if user.op == "call_function" and user.target.__name__ == "getitem":
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        if node.users:
            raise AssertionError(f"bitcpm.ternary_linear {node.name} has users other than getitem: {list(node.users)}")
        graph.erase_node(node)
        count += 1
    if count:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        log.info("bitcpm: lowered %d ternary layers to torch_npu kernels", count)
    return count


# --------------------------------------------------------------------------------------------
# packed inference: weights prepared once at compile time
# --------------------------------------------------------------------------------------------

_PACKED_LINEAR = torch.ops.bitcpm.ternary_linear_packed
_FROZEN_PREFIX = "_bitcpm_frozen_"  # buffers freeze_pack registered (it guards their source weights)
_PREPARED_FOLDED_AS = "prepared for Ascend at compile time (target='cann'; packed buffers are folded)"


def cann_prepared_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    path: str,
    group: int,
    quantize_activations: bool,
    out_features: int,
    chip: str = "A2",
) -> torch.Tensor:
    """Graph-level call of a layer prepared by :func:`prepare_packed_layers` (AOTAutograd traces it to npu.* ops)."""
    prepared = {"path": path, "weight": weight, "scale": scale, "group": group, "chip": chip}
    return get_kernel("cann").prepared_linear(x, prepared, bias, quantize_activations, out_features)


def _is_packed_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_PACKED_LINEAR, _PACKED_LINEAR.default)


def _match_decisions(
    gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision]
) -> dict[torch.fx.Node, LayerDecision]:
    """Packed-op node -> its decision: discover's "already packed" ones in graph order, freeze's by module name."""
    already = iter([d for d in decisions if d.kind == "packed"])
    frozen: dict[str, list[LayerDecision]] = {}
    for d in decisions:
        if d.kind != "packed" and d.rewritten and d.site is not None:
            frozen.setdefault(d.name, []).append(d)
    matched = {}
    for node in gm.graph.nodes:
        if not _is_packed_linear(node) or len(node.args) < 2:
            continue
        source = node.args[1]
        frozen_constant = isinstance(source, torch.fx.Node) and source.op == "get_attr"
        if frozen_constant and str(source.target).startswith(_FROZEN_PREFIX):
            module = calling_module(node)
            candidates = frozen.get(module[0] if module else "", [])
            if candidates:
                matched[node] = candidates.pop(0)
        elif (decision := next(already, None)) is not None:
            matched[node] = decision
    return matched


def _unique_name(gm: torch.fx.GraphModule, stem: str) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def prepare_packed_layers(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], decisions: Sequence[LayerDecision], chip: str = "A2",
    *, nz: bool = False, graph_mode: bool = False,
) -> list[FrozenParameter]:
    """Replace each ``bitcpm::ternary_linear_packed`` node by :func:`cann_prepared_linear` on prepared constants.

    For every packed layer of a Dynamo graph compiled for cann (whatever kernel the layer was
    packed for: the compile target decides), the 2-bit codes are unpacked once, here, and
    :func:`bitcompile.kernels.cann.prepare_packed` builds the Ascend weight and scale; they
    become buffers of ``gm``. Layers that violate a device constraint stay on the packed op
    with ``kernel="reference"`` (the float path, which unpacks per call) and the reason in
    their :class:`LayerDecision`. ``chip``, ``nz`` and ``graph_mode`` are the plan's inputs
    (:func:`bitcompile.kernels.cann_plan.plan_layer`): FRACTAL_NZ weights only where storage
    formats exist (an NPU) and, for ``npu_weight_quant_batchmatmul``, in torchair graphs.

    Returns the graph inputs (the packed buffers of the model) the compiled graph must watch:
    a changed ``packed`` or ``scales`` tensor makes :class:`FrozenWeightGuard` raise.
    """
    from torch._dynamo.source import ConstantSource

    cann = get_kernel("cann")
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index_of = {node: i for i, node in enumerate(placeholders)}
    matched = _match_decisions(gm, decisions)
    if not hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source = {}
    watched: dict[int, FrozenParameter] = {}
    folded_attrs: set[torch.fx.Node] = set()

    def tensor_of(node: Any) -> torch.Tensor | None:
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "placeholder" and index_of[node] < len(example_inputs):
            value = example_inputs[index_of[node]]
        elif node.op == "get_attr" and str(node.target).startswith(_FROZEN_PREFIX):
            value = getattr(gm, str(node.target), None)
        else:
            return None
        return value if isinstance(value, torch.Tensor) else None

    def register(stem: str, tensor: torch.Tensor) -> torch.fx.Node:
        name = _unique_name(gm, stem)
        gm.register_buffer(name, tensor)
        # AOTAutograd looks every buffer up here (it fails with "... not found in param_name_to_source").
        gm._param_name_to_source[name] = ConstantSource(name)
        return graph.get_attr(name)

    count = 0
    for node in list(graph.nodes):
        if not _is_packed_linear(node):
            continue
        decision = matched.get(node)
        if len(node.args) != 8 or node.kwargs:
            reason = "unexpected bitcpm::ternary_linear_packed call signature"
        else:
            x, packed_node, scales_node, bias, in_features, group_code, quantize_activations, _kernel = node.args
            packed, scales, x_val = tensor_of(packed_node), tensor_of(scales_node), _val(x)
            if packed is None or scales is None:
                reason = "packed weights are not graph inputs or frozen constants"
            elif not isinstance(x_val, torch.Tensor):
                reason = "input dtype unknown at compile time"
            else:
                reason = cann.unsupported_reason(
                    in_features, packed.shape[0], group_code, x_val.dtype, quantize_activations, chip
                )
        if reason is not None:
            if len(node.args) == 8:
                node.args = (*node.args[:7], "reference")
            note = f"kept on the float path (bitcpm reference kernels, unpacking the 2-bit codes per call): {reason}"
            kernels = ()
        else:
            prepared = cann.prepare_packed(packed, scales, in_features, group_code, quantize_activations, x_val.dtype,
                                           chip, nz=nz, graph_mode=graph_mode)  # fmt: skip
            out_features = packed.shape[0]
            with graph.inserting_before(node):
                weight_node = register("_bitcpm_cann_weight", prepared["weight"])
                scale_node = register("_bitcpm_cann_scale", prepared["scale"])
                path, group = prepared["path"], prepared["group"]
                args = (x, weight_node, scale_node, bias, path, group, quantize_activations, out_features, chip)
                new = graph.call_function(cann_prepared_linear, args)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for source in (packed_node, scales_node):
                if source.op == "placeholder":
                    index = index_of[source]
                    tensor = example_inputs[index]
                    watched.setdefault(
                        index,
                        frozen_parameter(decision.name if decision else str(source.target), index, tensor, _PREPARED_FOLDED_AS),
                    )
                else:
                    folded_attrs.add(source)
            count += 1
            group_note = f", antiquant_group_size={group}" if path == "weight_quant_batchmatmul" and group > 0 else ""
            note = f"{cann.describe_prepared(prepared)}{group_note}, weights prepared once at compile time"
            kernels = plan_kernels(cann.layer_plan(in_features, out_features, group_code, quantize_activations, x_val.dtype,
                                                   chip, nz=nz, graph_mode=graph_mode))  # fmt: skip
        if decision is not None:
            decision.lowering = Lowering("cann", kernels, note)
        log.debug("bitcpm cann packed: %s -> %s", decision.name if decision else node.name, note)
    # freeze=True's packed constants are not needed once their layer reads the prepared weights.
    for attr in folded_attrs:
        if not attr.users:
            name = str(attr.target)
            graph.erase_node(attr)
            delattr(gm, name)
            gm._param_name_to_source.pop(name, None)
    if count or folded_attrs:
        graph.lint()
        gm.recompile()
        log.info("bitcpm: %d packed layers run on weights prepared for Ascend", count)
    return list(watched.values())


def _has_npu_nodes(gm: torch.fx.GraphModule) -> bool:
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "npu"
        for n in gm.graph.nodes
    )


# --------------------------------------------------------------------------------------------
# the cann target's lowering (bitcompile.targets): plan on the Dynamo graph, lower post-AOT
# --------------------------------------------------------------------------------------------


def _torchair_compiler(example_inputs: Sequence[Any]) -> Callable | None:
    """torchair's post-AOT compiler when running on a real NPU with torch_npu (never on CPU)."""
    if not on_npu(example_inputs) or get_kernel("cann").PROVIDER != "torch_npu":
        return None
    if importlib.util.find_spec("torch_npu.dynamo") is None:
        return None
    import torchair  # torch_npu installs it lazily as sys.modules["torchair"]

    return torchair.get_compiler(torchair.CompilerConfig())


class CannLowering:
    """``target="cann"``'s :class:`~bitcompile.targets.Lowering` for one Dynamo graph.

    :meth:`plan` prepares packed layers and routes training layers for the chip
    (``config.chip``, or ``torch_npu.npu.get_device_name()``); :meth:`lower` replaces the
    cann layers of each post-AOT forward graph by torch_npu sequences. The backend compiles
    the rest: torchair on a real NPU (:attr:`graph_compiler`), inductor otherwise (or plain
    execution when ``config.inner`` asks for ``aot_eager`` / ``eager``).
    """

    label = "Ascend"

    def __init__(self, example_inputs: Sequence[Any], config: TernaryConfig) -> None:
        from bitcompile.kernels.cann_plan import resolve_chip

        self.chip = resolve_chip(config.chip)
        self.example_inputs = example_inputs
        self.graph_compiler = _torchair_compiler(example_inputs)

    def plan(self, gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision]) -> list[FrozenParameter]:
        """Prepare the packed layers' Ascend weights, then route the training layers; returns the watched inputs."""
        watched = prepare_packed_layers(
            gm, self.example_inputs, decisions, self.chip, nz=on_npu(self.example_inputs),
            graph_mode=self.graph_compiler is not None,
        )  # fmt: skip
        plan_cann_layers(gm, decisions, self.chip)
        return watched

    def lower(self, gm: torch.fx.GraphModule, decompositions: dict | None = None) -> bool:
        """Lower the training path's nodes; prepared packed layers arrive already traced to npu.*."""
        return bool(lower_to_cann(gm, decompositions, self.chip)) or _has_npu_nodes(gm)


__all__ = [
    "CannLowering",
    "cann_prepared_linear",
    "describe_lowering",
    "lower_to_cann",
    "plan_cann_layers",
    "prepare_packed_layers",
]
