"""User-facing options of the ``bitcpm`` backend, validated once into a frozen config.

``torch.compile(model, backend="bitcpm", options={...})`` hands its ``options`` dict to
:meth:`TernaryConfig.from_options`; Python users build :class:`TernaryConfig` directly.
Every mistake raises :class:`TernaryConfigError` naming the key, the value and what is
allowed, because a typo in a training job's options must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from bitcompile.kernels.groups import ACCEPTED_GROUP_SIZES, ScaleGroups
from bitcompile.targets import target_names

#: What ``group_size`` accepts; the config holds it as a :class:`ScaleGroups`.
GroupSize = int | Literal["tensor"] | ScaleGroups

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
ACTIVATION_MODES = ("int8", None)
BACKWARD_PRECISIONS = ("fp32", "bf16", "int8")
CANN_CHIPS = ("auto", "A2", "A3", "310P")  # kernels.cann_plan.CHIP_OPTIONS
#: Layer roles the ternary recipes (BitNet b1.58, BitCPM) keep in higher precision; ``float_roles``
#: lists the ones kept float. Embeddings are always float (there is no ternary embedding lookup).
LAYER_ROLES = ("head", "router")


class TernaryConfigError(ValueError):
    """An option of the bitcpm backend has a bad name or value."""


class BitcompileWarning(UserWarning):
    """Something bitcompile did is probably not what you meant (a layer kept float, a pattern that matches nothing)."""


def _bad(key: str, value: Any, allowed: str) -> TernaryConfigError:
    return TernaryConfigError(f"bitcpm option {key!r}={value!r} is invalid: expected {allowed}")


def _as_patterns(key: str, value: Any) -> tuple[str, ...]:
    # Only str, list and tuple: a dict would contribute its keys, a set its patterns in no fixed
    # order, and a generator would be consumed by the check below and leave nothing.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise _bad(key, value, "a glob pattern string or a list/tuple of them, e.g. ['lm_head', '*.router']")


@dataclasses.dataclass(frozen=True)
class TernaryConfig:
    """How the ``bitcpm`` backend quantizes a model.

    Args:
        group_size: ``-1`` one weight scale per output row (default, BitCPM-CANN's setting),
            ``"tensor"`` one scale per weight matrix (BitNet b1.58), a positive group
            length along the input dimension (32, 64, 128 ...), or a :class:`ScaleGroups`.
            The config holds it as a :class:`ScaleGroups` whichever spelling was passed.
        activations: ``"int8"`` per-token absmax int8 activations (W1.58A8), or ``None``
            for weight-only ternary quantization.
        exclude: glob patterns on module paths (``"lm_head"``, ``"*.router"``) kept float.
        include: if non-empty, only module paths matching one of these are rewritten.
        min_features: layers with ``in_features`` or ``out_features`` below this stay float.
        target: kernels to run: ``"auto"``, ``"reference"`` (pure PyTorch), ``"cpu"`` or
            ``"cann"`` (Ascend through torch_npu).
        inner: compiler for the rest of the graph: ``"inductor"``, ``"aot_eager"``, ``"eager"``.
        freeze: inference only (``model.eval()`` + ``torch.no_grad()``): quantize and pack the
            weights once at compile time; a later weight change raises until you recompile.
        backward_precision: GEMM precision of the training backward on the ``"cpu"`` kernels:
            ``"fp32"`` (the reference numerics), ``"bf16"`` (grad_input and grad_weight as bf16
            GEMMs) or ``"int8"`` (grad_input as int8 x ternary ``torch._int_mm``, grad_weight in
            bf16). The reference and cann kernels always compute the fp32 backward.
        float_roles: layer roles kept float, as the ternary recipes do: ``"head"`` (the output
            head: a linear named ``lm_head``, ``embed_out``, ``classifier`` or ``score``, tied or
            not) and ``"router"`` (an MoE router: a linear whose output feeds a top-k, or a module
            class named ``*Router``). ``()`` makes them ternary like any other layer.
        chip: the Ascend chip ``target="cann"`` plans for: ``"auto"`` (``torch_npu.npu.get_device_name()``
            on an NPU, ``"A2"`` on the CPU emulator), ``"A2"``, ``"A3"`` or ``"310P"`` (docs/cann.md).

    Example::

        >>> cfg = TernaryConfig.from_options({"group_size": 128, "exclude": "lm_head"})
        >>> cfg.group_size, cfg.exclude
        (ScaleGroups(kind='group', size=128), ('lm_head',))
    """

    group_size: GroupSize = ScaleGroups.per_row()
    activations: Literal["int8"] | None = "int8"
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    min_features: int = 0
    target: str = "auto"
    inner: str = "inductor"
    freeze: bool = False
    backward_precision: str = "fp32"
    chip: str = "auto"
    float_roles: tuple[str, ...] = LAYER_ROLES
    version: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "group_size", ScaleGroups.parse(self.group_size))
        except ValueError:
            raise _bad("group_size", self.group_size, ACCEPTED_GROUP_SIZES) from None
        if self.activations not in ACTIVATION_MODES:
            raise _bad("activations", self.activations, "'int8' or None (weight-only)")
        object.__setattr__(self, "exclude", _as_patterns("exclude", self.exclude))
        object.__setattr__(self, "include", _as_patterns("include", self.include))
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 0:
            raise _bad("min_features", self.min_features, "a non-negative int")
        if self.target not in target_names():
            raise _bad("target", self.target, f"one of {', '.join(target_names())}")
        if not isinstance(self.freeze, bool):
            raise _bad("freeze", self.freeze, "True or False")
        if self.inner not in INNER_COMPILERS:
            raise _bad("inner", self.inner, f"one of {', '.join(INNER_COMPILERS)}")
        if self.backward_precision not in BACKWARD_PRECISIONS:
            raise _bad("backward_precision", self.backward_precision, f"one of {', '.join(BACKWARD_PRECISIONS)}")
        roles = (self.float_roles,) if isinstance(self.float_roles, str) else self.float_roles
        if not isinstance(roles, (list, tuple)) or any(r not in LAYER_ROLES for r in roles):
            raise _bad("float_roles", self.float_roles, f"a list of roles out of {', '.join(LAYER_ROLES)} (or [])")
        object.__setattr__(self, "float_roles", tuple(dict.fromkeys(roles)))
        if self.chip not in CANN_CHIPS:
            raise _bad("chip", self.chip, f"one of {', '.join(CANN_CHIPS)}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | TernaryConfig | None) -> TernaryConfig:
        """Parse the ``options`` dict of ``torch.compile``; unknown keys are errors."""
        if options is None:
            return cls()
        if isinstance(options, TernaryConfig):
            return options
        if not isinstance(options, Mapping):
            raise TernaryConfigError(f"bitcpm options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"version"}
        unknown = sorted(set(options) - known)
        if unknown:
            key = unknown[0]
            raise TernaryConfigError(
                f"unknown bitcpm option {key!r}={options[key]!r}; allowed options: {', '.join(sorted(known))}"
            )
        return cls(**dict(options))

    def to_options(self) -> dict[str, Any]:
        """The inverse of :meth:`from_options` (JSON-friendly)."""
        out = dataclasses.asdict(self)
        out.pop("version")
        out["exclude"], out["include"] = list(self.exclude), list(self.include)
        out["float_roles"] = list(self.float_roles)
        out["group_size"] = self.group_size.option
        return out

    @property
    def group_code(self) -> int:
        """``group_size.code``: the int the op schemas and kernels take (-1 per row, 0 per tensor, g > 0)."""
        return self.group_size.code

    @property
    def quantize_activations(self) -> bool:
        return self.activations == "int8"


def as_config(config: TernaryConfig | Mapping[str, Any] | None, caller: str) -> TernaryConfig:
    """``config`` as a :class:`TernaryConfig`: None is the default, a dict is parsed like ``options``."""
    if config is None or isinstance(config, (TernaryConfig, Mapping)):
        return TernaryConfig.from_options(config)
    raise TernaryConfigError(
        f"{caller}: config must be a TernaryConfig or a dict of bitcpm options such as "
        f"{{'group_size': 128}}, got {type(config).__name__}"
    )

