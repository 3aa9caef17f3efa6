"""The decode step as an AOTInductor library: one call per token, no Dynamo, no Python between layers.

Why: under ``torch.compile`` every decode step enters through Dynamo, which checks guards on
each graph input (SmolLM2-135M's graph has 575: every packed weight, scale and cache
tensor), then AOTAutograd's Python runtime wrapper, then the C++ wrapper's size check of each
input. On SmolLM2-135M at 2 threads that host work was ~2 ms of a 5.4 ms token. Here
``torch.export`` traces the step once, the serving ops become the C++ operators
(:func:`~bitcompile.runtime.compiled_decode.swap_native_ops`), and AOTInductor compiles the
whole step into a shared library. A token is then one C++ call.

The library's weights and KV cache are *user-managed constants*: the model's own buffers and
the ``StaticCache``'s tensors, loaded by reference, not copied. So the prefill (the Dynamo graph
of :class:`~bitcompile.runtime.compiled_decode.CompiledDecoder`) and this step share one cache,
and the model's memory is not doubled. A buffer that is *replaced* on the model after export
(``layer.packed = ...``) would not be seen by the library: :meth:`AOTIDecodeStep.refresh` rebinds
the constants, and :meth:`CompiledDecoder.greedy` calls it before every generation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from bitcompile.kernels.cpu import library

__all__ = ["AOTIDecodeStep", "export_decode_step"]


class _DecodeStep(nn.Module):
    """The exported function: one token per sequence at ``position`` into ``cache``; its logits.

    The cache's tensors are registered as buffers so that export sees their in-place updates
    as buffer mutations (the form AOTInductor keeps as mutable constants)."""

    def __init__(self, model: nn.Module, cache: Any):
        super().__init__()
        self.model = model
        self.cache = cache
        for name, tensor in self.cache_tensors().items():
            self.register_buffer(name, tensor, persistent=False)

    def cache_tensors(self) -> dict[str, Tensor]:
        """The cache's tensors now, by buffer name (the cache may have replaced one since export)."""
        tensors = {}
        for i, layer in enumerate(self.cache.layers):
            tensors[f"key_cache_{i}"] = layer.keys
            tensors[f"value_cache_{i}"] = layer.values
            tensors[f"cumulative_length_{i}"] = layer.cumulative_length
        return tensors

    def forward(self, token: Tensor, position: Tensor) -> Tensor:
        # NOTE: transformers' StaticLayer writes at its own counter, not at cache_position; setting
        # the counter from the position makes each call independent of what ran before it
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(position[0])
        return self.model(token, cache=self.cache, cache_position=position, use_cache=True, logits_to_keep=1).logits


class AOTIDecodeStep:
    """A decode step compiled by AOTInductor (see :func:`export_decode_step`).

    Attributes:
        batch_size: sequences per call.
        package_path: the AOTInductor package (``.pt2``; weights are not inside it).
        native_ops: how many serving ops of each kind became C++ operators.
    """

    def __init__(self, step: _DecodeStep, package_path: str, batch_size: int, native_ops: dict[str, int]):
        self._step, self.package_path, self.batch_size, self.native_ops = step, package_path, batch_size, native_ops
        self._compiled = torch._inductor.aoti_load_package(package_path)
        self._fqns = self._compiled.get_constant_fqns()
        self._bound: dict[str, Tensor] = {}
        self.max_positions = int(step.cache.layers[0].keys.shape[2]) if step.cache.layers else 0
        self.refresh()

    def _current(self) -> dict[str, Tensor]:
        named = dict(self._step.named_buffers(remove_duplicate=False))
        named.update(self._step.named_parameters(remove_duplicate=False))
        named.update(self._step.cache_tensors())
        missing = [f for f in self._fqns if f not in named]
        if missing:
            raise RuntimeError(
                f"AOTIDecodeStep: the model no longer has {len(missing)} tensors the compiled step reads "
                f"(first: {missing[0]}); compile the decoder again"
            )
        return {f: named[f] for f in self._fqns}

    def refresh(self) -> bool:
        """Rebind the library's constants to the model's current tensors if any was replaced
        (in-place changes are seen anyway: the constants are the tensors themselves).
        Returns whether anything was rebound."""
        current = self._current()
        if len(current) == len(self._bound) and all(current[f] is self._bound[f] for f in current):
            return False
        for fqn, tensor in current.items():
            old = self._bound.get(fqn)
            if old is not None and (old.shape != tensor.shape or old.dtype != tensor.dtype):
                raise RuntimeError(
                    f"AOTIDecodeStep: {fqn} changed from {old.dtype} {tuple(old.shape)} to {tensor.dtype} "
                    f"{tuple(tensor.shape)} since the step was compiled; compile the decoder again"
                )
        self._compiled.load_constants(current, check_full_update=True, user_managed=True)
        self._bound = current  # NOTE: user-managed constants are borrowed: these references keep them alive
        return True

    def __call__(self, token: Tensor, position: int) -> Tensor:
        """Logits ``(batch, 1, vocab)`` of ``token`` ``(batch, 1)`` at cache slot ``position``."""
        if token.shape != (self.batch_size, 1) or token.dtype != torch.long:
            raise ValueError(
                f"AOTIDecodeStep: expected int64 token ids of shape ({self.batch_size}, 1), got {token.dtype} "
                f"{tuple(token.shape)}"
            )
        if not 0 <= position < self.max_positions:  # the library indexes the cache unchecked
            raise ValueError(
                f"AOTIDecodeStep: position {position} is outside the static cache (0..{self.max_positions - 1})"
            )
        return self._compiled.loader.boxed_run([token, torch.tensor([position])])[0]


def export_decode_step(
    model: nn.Module, cache: Any, batch_size: int, *, package_dir: str | None = None, decode_threads: int | None = 1
) -> AOTIDecodeStep:
    """Export ``model``'s one-token step over ``cache`` (a ``StaticCache`` allocated for
    ``batch_size``) and compile it with AOTInductor.

    Args:
        model: a packed Hugging Face causal LM in eval mode (its attention already chosen).
        cache: the static cache the step reads and writes (shared with whatever fills it).
        batch_size: sequences per call; the step is specialized to it.
        package_dir: where the ``.pt2`` goes (a new temporary directory when None).
        decode_threads: OpenMP threads of inductor's own kernels (norms, rotary); the ternary
            layers and the head use torch's thread count. None keeps torch's.

    Returns:
        The loaded :class:`AOTIDecodeStep`.

    Raises:
        Whatever ``torch.export`` raises for a model it cannot trace (callers fall back).
    """
    from bitcompile.runtime.compiled_decode import swap_native_ops

    step = _DecodeStep(model, cache)
    example = (torch.zeros(batch_size, 1, dtype=torch.long), torch.tensor([0]))
    with torch.no_grad(), warnings.catch_warnings():
        # transformers' output-capturing and kernel registries are globals Dynamo reports as side
        # effects; export still traces the step exactly (the tests compare its logits)
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
        exported = torch.export.export(step, example, strict=True)
    counts = swap_native_ops(exported.graph_module, library.isa_id())
    directory = package_dir or tempfile.mkdtemp(prefix="bitcompile-aoti-")
    path = os.path.join(directory, f"decode_step_b{batch_size}.pt2")
    configs: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}
    if decode_threads is not None:
        configs["cpp.threads"] = decode_threads
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=configs)
        compiled = AOTIDecodeStep(step, path, batch_size, counts)
    except BaseException:
        if package_dir is None:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    if package_dir is None:  # ours: removed with the step (the loaded library stays mapped until then)
        weakref.finalize(compiled, shutil.rmtree, directory, True)
    return compiled
