"""Lower ``bitcpm`` ops to torch_npu kernels for ``target="cann"`` (DESIGN.md §5).

Two passes and the compile step that runs them:

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

Training graphs quantize the weight in the graph (it changes every step); packed inference
weights are prepared once at pack time (int8 ``(K, N)`` copies, int4 packing,
``npu_format_cast(w, 29)`` on hardware), never inside the graph.
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
from bitcompile.kernels import get_kernel
from bitcompile.passes.discover import LayerDecision

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


def describe_lowering(n_groups: int, group_code: int, quantize_activations: bool) -> str:
    """The torch_npu sequence a layer is lowered to, as the explain report prints it."""
    cann = get_kernel("cann")
    if cann.uses_quant_matmul(n_groups, quantize_activations):
        return "Ascend: npu_dynamic_quant -> npu_quant_matmul"
    group = f"antiquant_group_size={group_code}" if n_groups > 1 else "per-channel scales"
    prefix = "npu_dynamic_quant (dequantized) -> " if quantize_activations else ""
    return f"Ascend: {prefix}npu_weight_quant_batchmatmul ({group})"


def plan_cann_layers(gm: torch.fx.GraphModule, decisions: Sequence[LayerDecision]) -> int:
    """Route each ``bitcpm::ternary_linear`` node to kernel ``"cann"`` or back to ``"reference"``.

    Returns the number of layers that will run on torch_npu kernels.
    """
    from bitcompile.kernels.groups import num_groups

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
            reason = cann.unsupported_reason(k, n, group_code, x_val.dtype)
        if reason is None:
            lowered += 1
            note = describe_lowering(num_groups(k, group_code), group_code, quantize_activations)
        else:
            node.args = (*node.args[:5], "reference")
            note = f"kept on the float path (bitcpm reference kernels): {reason}"
        if decision is not None:
            decision.reason = f"{decision.reason}; {note}"
        log.debug("bitcpm cann plan: %s -> %s", decision.name if decision else node.name, note)
    gm.recompile()
    return lowered


def _training_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_code: int, quantize_activations: bool
):
    """``bitcpm::ternary_linear``'s five outputs computed with the cann kernels (traced into the graph)."""
    cann = get_kernel("cann")
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    w_codes, w_scales = cann.quantize_weight(weight, group_code)
    if quantize_activations:
        x_codes, x_scales = cann.quantize_activations(x2d)
        y2d = cann.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_code, bias, x.dtype)
    else:
        x_codes, x_scales = x.new_empty((0,), dtype=torch.int8), x.new_empty((0,), dtype=torch.float32)
        y2d = cann.float_ternary_matmul(x2d, w_codes, w_scales, group_code, bias, x.dtype)
    return y2d.reshape(*x.shape[:-1], n), x_codes, x_scales, w_codes, w_scales


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


def lower_to_cann(gm: torch.fx.GraphModule, decompositions: dict | None = None) -> int:
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
            return _training_forward(tensors[0], tensors[1], tensors[2] if _b else None, _g, _q)

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
# compiling a graph for target="cann"
# --------------------------------------------------------------------------------------------


def _on_npu(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "npu" for t in example_inputs)


def _torchair_compiler(example_inputs: Sequence[Any]) -> Callable | None:
    """torchair's post-AOT compiler when running on a real NPU with torch_npu (never on CPU)."""
    if not _on_npu(example_inputs) or get_kernel("cann").PROVIDER != "torch_npu":
        return None
    if importlib.util.find_spec("torch_npu.dynamo") is None:
        return None
    import torchair  # torch_npu installs it lazily as sys.modules["torchair"]

    return torchair.get_compiler(torchair.CompilerConfig())


def compile_for_cann(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    decisions: Sequence[LayerDecision],
    config: TernaryConfig,
    mode: str | None = None,
) -> tuple[Callable[..., Any], str]:
    """Plan, lower post-AOT and compile one Dynamo graph; returns (compiled fn, graph code to report).

    The rest of the graph goes to torchair on a real NPU, to inductor otherwise (or to
    ``aot_eager`` / plain execution when ``config.inner`` asks for it).
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    plan_cann_layers(gm, decisions)
    lowered: list[str] = []

    def lower(g: torch.fx.GraphModule, decompositions: dict | None = None) -> None:
        if lower_to_cann(g, decompositions):
            lowered.append(g.code)

    torchair = _torchair_compiler(example_inputs)
    if torchair is None and config.inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        from torch._inductor.decomposition import select_decomp_table

        def inner_compile(g, ex, **kwargs):
            lower(g, select_decomp_table())
            return compile_fx_inner(g, ex, **kwargs)

        patches = list_mode_options(mode) if mode not in (None, "default") else {}
        compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
    else:
        base = torchair or (lambda g, ex: make_boxed_func(g.forward))

        def forward_compiler(g, ex):
            lower(g)
            return base(g, ex)

        compiled = aot_autograd(fw_compiler=forward_compiler, bw_compiler=base, inference_compiler=forward_compiler)(
            gm, example_inputs
        )
    after = gm.code
    for code in lowered:
        after += "\n# ---- lowered for Ascend (post-AOT forward graph) ----\n" + code
    return compiled, after


__all__ = ["compile_for_cann", "describe_lowering", "lower_to_cann", "plan_cann_layers"]
