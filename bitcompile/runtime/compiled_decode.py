"""compile_decoder(): a packed causal LM's whole forward (all layers, attention over a static
KV cache, the head) as one inductor-compiled graph whose layers are C++ operator calls.

Why: eager decode runs each of SmolLM2-135M's 210 ternary layers through a Python module
forward and a ctypes call, ~41 us per layer where the GEMV needs a few (issue 14). Here
Dynamo traces the model once per shape (prefill length, and one token for decode), the
``bitcpm::`` serving ops in that graph are swapped for their C++ twins
``torch.ops.bitcpm_native.*`` (:mod:`bitcompile.kernels.native`), and inductor compiles the
rest (norms, rotary, attention over the static cache, sampling-free glue) into C++ kernels.
With ``cpp_wrapper=True`` (the default) the per-token host code is C++ as well. A model on SDPA
has its one-token attention switched to a C++ operator too
(:mod:`bitcompile.runtime.decode_attention`; :meth:`CompiledDecoder.uninstall` switches it back).

Both entry points run the compiled forward: ``model.generate(...)`` (transformers' loop, with
``cache_implementation="static"`` set on the model's generation config) and
:meth:`CompiledDecoder.greedy` (a plain greedy loop over one reused ``StaticCache``).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bitcompile.config import BitcompileWarning
from bitcompile.kernels import native
from bitcompile.kernels.cpu import library
from bitcompile.runtime import decode_attention

__all__ = ["CompiledDecoder", "compile_decoder", "swap_native_ops"]

log = logging.getLogger("bitcompile.runtime.compiled_decode")

_warned_python_ops = False


def _meta(node: torch.fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _is_call(node: torch.fx.Node, name: str) -> bool:
    """Whether ``node`` calls ``torch.ops.bitcpm.<name>`` (the packet, its overload, or the custom_op object)."""
    if node.op != "call_function":
        return False
    target = node.target
    qualname = getattr(target, "_qualname", None) or getattr(target, "_name", None) or ""
    if not qualname and hasattr(target, "name") and callable(target.name):
        qualname = target.name()
    return qualname in (f"bitcpm::{name}", f"bitcpm::{name}.default") or str(target) in (
        f"bitcpm.{name}.default", f"bitcpm.{name}",
    )  # fmt: skip


def _arg(node: torch.fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def swap_native_ops(gm: torch.fx.GraphModule, isa: int) -> dict[str, int]:
    """Replace the serving ops of a Dynamo graph by their C++ operators where they compute the
    same thing (W1.58A8 on the ``cpu`` kernels; the W8A8 head with an fp32 or no bias; the fp32
    GEMV head). Returns how many nodes of each kind were swapped and how many were kept (with
    ``kept:<op>`` keys): a layer the C++ op does not cover keeps its Python op, said in the log."""
    ops = torch.ops.bitcpm_native
    counts: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if _is_call(node, "ternary_linear_packed"):
            names = ("x", "packed", "scales", "bias", "in_features", "group_size", "quantize_activations", "kernel")
            a = [_arg(node, i, n) for i, n in enumerate(names)]
            if a[7] == "cpu" and a[6] is True:
                node.target, node.args, node.kwargs = ops.ternary_linear_packed.default, (*a[:6], isa), {}
                counts["ternary_linear_packed"] = counts.get("ternary_linear_packed", 0) + 1
            else:
                counts["kept:ternary_linear_packed"] = counts.get("kept:ternary_linear_packed", 0) + 1
        elif _is_call(node, "int8_dense_linear"):
            a = [_arg(node, i, n) for i, n in enumerate(("x", "codes", "scales", "bias"))]
            bias, codes = _meta(a[3]), _meta(a[1])
            if (bias is None or bias.dtype == torch.float32) and codes is not None and codes.shape[-1] <= 65_000:
                node.target, node.args, node.kwargs = ops.int8_dense_linear.default, (*a, isa), {}
                counts["int8_dense_linear"] = counts.get("int8_dense_linear", 0) + 1
            else:
                counts["kept:int8_dense_linear"] = counts.get("kept:int8_dense_linear", 0) + 1
        elif _is_call(node, "float_gemv_linear"):
            a = [_arg(node, i, n) for i, n in enumerate(("x", "weight", "bias"))]
            node.target, node.args, node.kwargs = ops.float_gemv_linear.default, (*a, isa), {}
            counts["float_gemv_linear"] = counts.get("float_gemv_linear", 0) + 1
    gm.graph.lint()
    gm.recompile()
    return counts


INNER_COMPILERS = ("inductor", "aot_eager")
DECODE_STEPS = ("aoti", "dynamo")


def is_decode_graph(example_inputs: list) -> bool:
    """Whether a graph's token ids are one token per sequence (its 2-D int64 inputs have width 1)."""
    ids = [t for t in example_inputs if isinstance(t, Tensor) and t.dim() == 2 and t.dtype == torch.long]
    return bool(ids) and all(t.shape[-1] == 1 for t in ids)


def _native_backend(
    inner: str, cpp_wrapper: bool, decode_threads: int | None, records: list[dict[str, int]]
) -> Callable:
    """A torch.compile backend: swap in the C++ operators, then ``inner`` (inductor, or
    aot_eager where tests need the same graph without inductor's C++ compile time)."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        records.append(swap_native_ops(gm, library.isa_id()) if native.load() else {})
        if inner == "aot_eager":
            from torch._dynamo import lookup_backend

            return lookup_backend("aot_eager")(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        patches: dict[str, Any] = {"cpp_wrapper": cpp_wrapper}
        if decode_threads is not None and is_decode_graph(example_inputs):
            # NOTE: a decode step's elementwise work (norms, rotary, residuals) is ~1k values per
            # kernel; an OpenMP team per kernel costs more than it saves, and on a busy machine a
            # descheduled team member stalls every barrier. The layers' C++ ops keep all threads.
            patches["cpp.threads"] = decode_threads
        return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


# the arguments transformers' generate() passes a one-token step that the AOTInductor step
# computes the same way (a 2-D attention_mask of ones becomes the static causal mask it builds)
_ROUTABLE = frozenset(
    {"input_ids", "cache", "attention_mask", "use_cache", "return_dict", "logits_to_keep", "cache_position", "position_ids"}
)


def _plain_position(kwargs: dict, position: int) -> bool:
    """Whether a step's ``cache_position`` and ``position_ids`` (where given) are all the cache's
    next slot (with padding, generate() gives rows other position ids)."""
    for name in ("cache_position", "position_ids"):
        given = kwargs.get(name)
        if given is not None and not (given.numel() >= 1 and int(given.min()) == position == int(given.max())):
            return False
    return True


def _allocate(cache: Any, model: nn.Module, batch_size: int) -> None:
    """Allocate a StaticCache's tensors now (``early_initialization``) where the config says their
    shapes. Why: a cache allocated lazily inside the first prefill is a different graph input
    than an allocated one, so the first prefill would compile twice (minutes with cpp_wrapper)."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", None)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // c.num_attention_heads if heads else None)
    if heads is None or head_dim is None or not hasattr(cache, "early_initialization"):
        return  # lazily allocated: one more prefill graph, nothing wrong
    parameter = next(model.parameters(), None)
    dtype = getattr(model, "dtype", None) or (parameter.dtype if parameter is not None else torch.float32)
    cache.early_initialization(batch_size, heads, head_dim, dtype, torch.device("cpu"))


class CompiledDecoder:
    """A packed causal LM whose forward is compiled (see :func:`compile_decoder`).

    Attributes:
        model: the model; its ``forward`` is the compiled one until :meth:`uninstall`.
        native: whether the layers run as C++ operators (False: the Python ops, warned once).
        graphs: per compiled graph, how many serving ops became C++ operators
            (``kept:<op>`` counts those that kept the Python op).
        decode_path: ``"aoti"`` or ``"dynamo"``: what runs :meth:`decode_step` on this decoder's
            static caches; ``decode_path_reason`` says why (e.g. what export could not trace).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner: str,
        cpp_wrapper: bool,
        decode_threads: int | None,
        max_cache_len: int,
        dynamic: bool | None,
        decode_step: str = "dynamo",
    ):
        self.model, self.max_cache_len, self.cpp_wrapper = model, max_cache_len, cpp_wrapper
        self._decode_threads = decode_threads
        self.graphs: list[dict[str, int]] = []
        self.native = native.load()
        self._previous_attention, self.attention = (
            decode_attention.install(model) if self.native else (None, "kept the model's attention (no C++ operators)")
        )
        self._eager_forward = model.forward
        backend = _native_backend(inner, cpp_wrapper, decode_threads, self.graphs) if self.native else inner
        eager = self._eager_forward

        # NOTE: two entry functions, so Dynamo keeps two caches: decode (one token) stays a static
        # graph whatever prompt lengths the prefill entry sees (automatic dynamic shapes would
        # otherwise recompile both as one dynamic graph after the second shape).
        def decode_forward(*args: Any, **kwargs: Any) -> Any:
            return eager(*args, **kwargs)

        def prefill_forward(*args: Any, **kwargs: Any) -> Any:
            return eager(*args, **kwargs)

        self._decode = torch.compile(decode_forward, backend=backend, fullgraph=True, dynamic=False)
        self._prefill = torch.compile(prefill_forward, backend=backend, fullgraph=True, dynamic=dynamic)
        self._caches: dict[int, Any] = {}
        self._aoti_steps: dict[int, Any] = {}
        self._routed: tuple[Any, Any] | None = None  # (cache, step) while generate() runs
        if decode_step == "aoti" and not self.native:
            decode_step, why = "dynamo", "the C++ operators are unavailable, so the decode step stays a Dynamo graph"
        elif decode_step == "aoti":
            why = "greedy() and decode_step() on this decoder's static caches run an AOTInductor library"
        else:
            why = "decode steps run the Dynamo graph"
        self.decode_path, self.decode_path_reason = decode_step, why

    def _compiled(self, *args: Any, **kwargs: Any) -> Any:
        """The installed forward: the decode graph for one token per sequence, else prefill;
        inside :meth:`generate`, a plain one-token step on its cache goes to the AOTInductor step."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        one_token = isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[-1] == 1
        routed = self._routed
        if routed is not None and one_token and not args and kwargs.get("cache") is routed[0]:
            cache, step = routed
            position = int(cache.layers[0].cumulative_length)
            plain = set(kwargs) <= _ROUTABLE and kwargs.get("return_dict", True) is not False
            if plain and _plain_position(kwargs, position):
                from transformers.modeling_outputs import CausalLMOutputWithPast

                return CausalLMOutputWithPast(logits=step(ids, position), cache=cache)
        return (self._decode if one_token else self._prefill)(*args, **kwargs)

    def install(self) -> None:
        """``model.forward`` becomes the compiled forward and ``generate()`` uses a static cache."""
        compiled = self._compiled

        def forward(*args: Any, **kwargs: Any) -> Any:
            return compiled(*args, **kwargs)

        # NOTE: generate() reads the forward's signature to decide what to pass: without
        # logits_to_keep there, its prefill computed the head for every prompt position
        forward.__signature__ = inspect.signature(self._eager_forward)  # type: ignore[attr-defined]
        forward.__doc__ = self._eager_forward.__doc__
        self.model.forward = forward
        config = getattr(self.model, "generation_config", None)
        if config is not None:
            config.cache_implementation = "static"
            config.disable_compile = True  # this forward is compiled already: no second torch.compile
            # transformers sizes its StaticCache from max_length; greedy() uses max_cache_len

    def uninstall(self) -> None:
        """Give the model back its eager forward and attention (the generation config keeps the
        static cache)."""
        self.model.__dict__.pop("forward", None)
        if self._previous_attention is not None:
            self.model.set_attn_implementation(self._previous_attention)
            self._previous_attention = None

    def static_cache(self, batch_size: int = 1) -> Any:
        """The ``StaticCache`` :meth:`greedy` reuses for ``batch_size`` sequences, its tensors
        allocated once (the same graph inputs every call: no recompilation)."""
        if batch_size not in self._caches:
            from transformers import StaticCache

            cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            _allocate(cache, self.model, batch_size)
            self._caches[batch_size] = cache
            if self.decode_path == "aoti":
                self._export_step(cache, batch_size)
        return self._caches[batch_size]

    def _export_step(self, cache: Any, batch_size: int) -> None:
        """Compile the AOTInductor decode step over ``cache``; where that fails (a model export
        cannot trace, no working C++ compiler) the Dynamo graph stays, said once
        (``decode_path_reason``) in a BitcompileWarning."""
        from bitcompile.runtime.aoti_decode import export_decode_step

        try:
            self._aoti_steps[batch_size] = export_decode_step(
                self.model, cache, batch_size, decode_threads=self._decode_threads
            )
        except Exception as e:  # export covers less than Dynamo: such a model still decodes
            self.decode_path = "dynamo"
            self.decode_path_reason = f"the AOTInductor decode step could not be built ({type(e).__name__}: {e})"[:500]
            warnings.warn(
                f"compile_decoder: {self.decode_path_reason}; decode steps run the Dynamo graph (slower host code)",
                BitcompileWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def greedy(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """A plain greedy loop on the compiled forward: prefill once, then one token per step.

        Args:
            input_ids: ``(batch, prompt)`` token ids.
            max_new_tokens: tokens to append.

        Returns:
            ``(batch, prompt + max_new_tokens)`` ids.
        """
        batch, prompt = input_ids.shape
        if prompt < 1 or max_new_tokens < 0:
            raise ValueError(f"greedy: need a non-empty prompt and max_new_tokens >= 0, got {prompt} and {max_new_tokens}")
        if prompt + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"greedy: prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds the static cache "
                f"(max_cache_len={self.max_cache_len}); pass a larger max_cache_len to compile_decoder"
            )
        cache = self.static_cache(batch)
        cache.reset()
        out = [input_ids]
        logits = self.prefill(input_ids, cache)
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = self.decode_step(token, prompt + step, cache)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, **kwargs: Any) -> Any:
        """transformers' ``model.generate`` on this decoder's static cache (:meth:`static_cache`,
        reset first), its one-token steps run by the AOTInductor step where ``decode_path`` is
        ``"aoti"``. The prefill, and every step with padding (an ``attention_mask`` with zeros,
        position ids other than the cache's next slot), ``inputs_embeds`` or outputs beyond
        logits, run the ``torch.compile`` graphs. ``kwargs`` go to ``model.generate`` unchanged (greedy or sampling alike).
        transformers' own per-token Python (input preparation, masks, logits processors) still
        runs: on SmolLM2-135M it costs more than the decode step itself; :meth:`greedy` has none.

        Returns:
            What ``model.generate`` returns.
        """
        if "cache" in kwargs or "past_key_values" in kwargs:
            raise ValueError("CompiledDecoder.generate: it passes its own static cache; call model.generate for another")
        batch = input_ids.shape[0]
        cache = self.static_cache(batch)
        cache.reset()
        step = self._aoti_steps.get(batch)
        mask = kwargs.get("attention_mask")
        if step is not None and (mask is None or bool(mask.all())):
            step.refresh()
            self._routed = (cache, step)
        # transformers refuses a cache object beside a cache_implementation, and fills an unset
        # one from the model's generation config (where install() put "static")
        configs = [c for c in (kwargs.get("generation_config"), self.model.generation_config) if c is not None]
        saved = [c.cache_implementation for c in configs]
        for c in configs:
            c.cache_implementation = None
        try:
            return self.model.generate(input_ids, cache=cache, **kwargs)
        finally:
            self._routed = None
            for c, value in zip(configs, saved):
                c.cache_implementation = value

    def prefill(self, input_ids: Tensor, cache: Any) -> Tensor:
        """Run the prompt into ``cache``; the logits of its last token ``(batch, 1, vocab)``.
        On this decoder's own cache it also rebinds the AOTInductor step to any buffer replaced
        on the model since the last sequence (the step's weights are fixed per sequence)."""
        step = self._aoti_steps.get(input_ids.shape[0])
        if step is not None and cache is self._caches.get(input_ids.shape[0]):
            step.refresh()
        positions = torch.arange(input_ids.shape[1])
        return self.model(input_ids, cache=cache, cache_position=positions, use_cache=True, logits_to_keep=1).logits

    def decode_step(self, token: Tensor, position: int, cache: Any) -> Tensor:
        """One token ``(batch, 1)`` at ``position``; its logits ``(batch, 1, vocab)``. On this
        decoder's own static cache (:meth:`static_cache`) with ``decode_path == "aoti"`` it is one
        call into the AOTInductor library, whose weights are bound at each :meth:`prefill` (a
        buffer replaced on the model mid-sequence is used from the next prefill on); otherwise
        the Dynamo graph."""
        step = self._aoti_steps.get(token.shape[0])
        if step is not None and cache is self._caches.get(token.shape[0]):
            return step(token, position)
        return self.model(
            token, cache=cache, cache_position=torch.tensor([position]), use_cache=True, logits_to_keep=1
        ).logits


def compile_decoder(
    model: nn.Module,
    *,
    max_cache_len: int = 512,
    inner: str = "inductor",
    cpp_wrapper: bool = True,
    decode_threads: int | None = 1,
    dynamic: bool | None = None,
    decode_step: str | None = None,
) -> CompiledDecoder:
    """Compile a packed Hugging Face causal LM's forward for serving and install it on the model.

    The ternary layers (``pack``), the int8 or fp32 head, attention over a static KV cache and
    everything between them run as one inductor graph per shape; the layers are calls of the
    C++ operators ``torch.ops.bitcpm_native.*``, so no Python runs per layer. After this call,
    ``model.generate(...)`` and ``model(...)`` run compiled; :meth:`CompiledDecoder.greedy` is a
    plain greedy loop over a reused static cache.

    Notes:
        - Threads: inductor fixes its kernels' OpenMP team size when it compiles; set
          ``torch.set_num_threads`` before the first call.
        - Shapes: decode (one token) is one static graph; prompt lengths compile a graph each,
          and from the second distinct length on Dynamo makes the prefill length dynamic
          (``dynamic=None``, which applies to prefill only).
        - Without a C++ toolchain the layers keep the Python ops (one BitcompileWarning).

    Args:
        model: a packed causal LM (``bitcompile.pack``), e.g. ``LlamaForCausalLM``, in eval mode.
        max_cache_len: the static KV cache length :meth:`CompiledDecoder.greedy` allocates.
        inner: ``"inductor"`` (serving), or ``"aot_eager"`` (the same graph and C++ operators
            without inductor's code generation: quick to compile, for tests).
        cpp_wrapper: inductor's C++ wrapper: the graph's host code is C++ too (SmolLM2-135M at 1
            thread: 67 -> ~110 tok/s decode on its own). Compiling takes longer: ~5-9 min for
            SmolLM2's prefill and decode graphs on 2 cores the first time instead of ~2, then
            ~20-30 s from inductor's on-disk cache. False: the Python wrapper.
        decode_threads: OpenMP threads of inductor's own kernels in decode graphs (one token):
            1 by default, their work is too small to share; None keeps torch's thread count.
            The ternary layers and the head use torch's thread count either way.
        dynamic: passed to ``torch.compile``.
        decode_step: what runs a decode step of :meth:`CompiledDecoder.greedy` and
            :meth:`CompiledDecoder.decode_step`: ``"aoti"`` (the default with ``inner="inductor"``)
            compiles it with AOTInductor (:mod:`bitcompile.runtime.aoti_decode`; ~30-40 s per batch
            size, at the first :meth:`CompiledDecoder.static_cache` of that size), so a token is one
            C++ call with no Dynamo guards or Python wrapper (SmolLM2-135M at 2 threads: ~185 ->
            ~300 tok/s); ``"dynamo"`` keeps the ``torch.compile`` graph. ``model.generate`` and
            ``model(...)`` always run the ``torch.compile`` graphs. ``decode_path`` and
            ``decode_path_reason`` on the result say which one runs and why.

    Returns:
        The :class:`CompiledDecoder` (its ``model`` is ``model``).
    """
    global _warned_python_ops
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"compile_decoder: expected a Hugging Face causal LM (an nn.Module with .config), got {type(model).__name__}")
    if model.training:
        raise ValueError("compile_decoder: the model is in training mode; call model.eval() first")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"compile_decoder: inner must be one of {INNER_COMPILERS}, got {inner!r}")
    if decode_step is None:
        decode_step = "aoti" if inner == "inductor" else "dynamo"
    if decode_step not in DECODE_STEPS:
        raise ValueError(f"compile_decoder: decode_step must be one of {DECODE_STEPS}, got {decode_step!r}")
    if decode_step == "aoti" and inner != "inductor":
        raise ValueError("compile_decoder: decode_step='aoti' compiles with AOTInductor; it needs inner='inductor'")
    if max_cache_len < 1:
        raise ValueError(f"compile_decoder: max_cache_len must be >= 1, got {max_cache_len}")
    from bitcompile.runtime.layers import PackedTernaryLinear

    base3 = [name for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear) and m.layout != "2bit"]
    if base3:
        raise ValueError(
            f"compile_decoder: {len(base3)} layers (first: {base3[0]}) are in the 1.6-bit layout; the compiled "
            "decode has 2-bit C++ operators only: pack with layout='2bit' (or layer.to_layout('2bit'))"
        )
    decoder = CompiledDecoder(
        model, inner=inner, cpp_wrapper=cpp_wrapper, decode_threads=decode_threads, max_cache_len=max_cache_len,
        dynamic=dynamic, decode_step=decode_step,
    )
    if not decoder.native and not _warned_python_ops:
        _warned_python_ops = True
        warnings.warn(
            f"compile_decoder: {native.unavailable_reason()}; the compiled graph calls the Python serving ops "
            "(one Python call per layer and token)",
            BitcompileWarning,
            stacklevel=2,
        )
    decoder.install()
    return decoder
