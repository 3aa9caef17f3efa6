"""Reading and editing a model's module tree: what counts as a linear layer, tied parameters,
swapping a submodule (hooks follow it), weight bytes. Shared by ``pack``, ``load_packed`` and
``pack(example_inputs=)``'s agreement with the compiler.
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import Tensor, nn

from bitcompile.config import BitcompileWarning

__all__ = ["LinearView", "linear_view", "parameter_names", "replace_submodule", "weight_nbytes"]


@dataclasses.dataclass(frozen=True)
class LinearView:
    """A linear-like module seen as ``y = x @ weight.T + bias`` with an ``(out, in)`` weight."""

    weight: Tensor  # (out, in); a transposed view for Conv1D-style modules
    bias: Tensor | None
    parameter: nn.Parameter  # what the module stores (tie detection, dtype, device)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def linear_view(module: nn.Module) -> LinearView | None:
    """``nn.Linear``, or a GPT-2 style ``Conv1D`` (weight stored ``(in, out)``, ``y = x @ W + b``)."""
    if isinstance(module, nn.Linear):
        return LinearView(module.weight, module.bias, module.weight)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2:
        if getattr(module, "nf", weight.shape[1]) == weight.shape[1]:
            return LinearView(weight.t(), getattr(module, "bias", None), weight)
    return None


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → every dotted name it has (more than one for tied weights)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


#: Module hook dicts that describe calls, not parameters: they move to a replacement module.
_CALL_HOOKS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
)  # fmt: skip
#: Hook dicts about the old module's parameters and state_dict layout: they cannot follow it.
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name``; the old module's forward/backward hooks move to ``new``.

    The hook dicts themselves move, so the user's ``RemovableHandle``s still remove them.
    State-dict hooks are about the old parameters and are dropped with a warning.
    """
    parent, _, child = name.rpartition(".")
    old = model.get_submodule(name)
    for attr in _CALL_HOOKS:
        if attr in old.__dict__:
            setattr(new, attr, getattr(old, attr))
    if dropped := [attr for attr in _STATE_HOOKS if getattr(old, attr, None)]:
        warnings.warn(
            f"layer {name!r}: its {', '.join(dropped)} hooks refer to the replaced module's parameters "
            f"and were dropped when it became {type(new).__name__}",
            BitcompileWarning,
            stacklevel=3,
        )
    setattr(model.get_submodule(parent), child, new)


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.nbytes
    return total
