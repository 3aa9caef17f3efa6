"""Count the torch.distributed collectives a block of code issues, and their bytes (with the profiler).

Every collective of a ``ProcessGroup`` goes through a ``c10d::`` dispatcher op
(``c10d::allreduce_``, ``c10d::_allgather_base_``, ``c10d::_reduce_scatter_base_`` ...),
which the PyTorch profiler records with its input shapes and dtypes; nothing is patched.
DTensor's functional collectives end in the same ``c10d::`` ops.

The bytes of a collective are its **payload**: the size of the whole tensor it reduces or
gathers (an all-reduce's tensor, an all-gather's output, a reduce-scatter's input), the
"size" of nccl-tests. What crosses a link depends on the algorithm: a ring moves about
``2 (world - 1) / world`` payloads per rank for an all-reduce and ``(world - 1) / world`` for an
all-gather or a reduce-scatter.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torch.profiler import ProfilerActivity, profile

#: the profiler's dtype names → bytes per element
_DTYPE_BYTES = {
    "float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "int": 4, "long int": 8, "short int": 2,
    "signed char": 1, "unsigned char": 1, "bool": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1,
}  # fmt: skip


class CollectiveCount(collections.Counter):
    """``{c10d op name: calls}``; ``.total`` is the sum, ``.bytes`` ``{c10d op name: payload bytes}``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _backend_dtype(events: list, index: int) -> str | None:
    """The dtype of the backend's own event (``gloo:all_reduce``, ``nccl:all_reduce``) that follows ``events[index]``.

    A TensorList argument has no dtype in the profiler; the process group's event that runs it has.
    """
    for event in events[index + 1 : index + 50]:
        name = event.name
        if name.startswith("c10d::"):
            return None
        if ":" in name and "::" not in name:
            dtypes = [d for d in (getattr(event, "input_dtypes", None) or []) if d in _DTYPE_BYTES]
            if dtypes:
                return dtypes[0]
    return None


def _payload_bytes(events: list, index: int) -> int:
    """The largest tensor argument of the ``c10d::`` event ``events[index]`` in bytes (a TensorList's tensors summed)."""
    event = events[index]
    shapes = getattr(event, "structured_input_shapes", None) or []
    dtypes = list(getattr(event, "input_dtypes", None) or [])
    backend_dtype = _backend_dtype(events, index) if "TensorList" in dtypes else None
    child_dtypes = [backend_dtype] if backend_dtype else []
    best = 0
    for shape, dtype in zip(shapes, dtypes + [""] * (len(shapes) - len(dtypes))):
        if dtype == "TensorList" and shape and isinstance(shape[0], list):
            size = _DTYPE_BYTES.get(child_dtypes[0], 0) if child_dtypes else 0  # the backend's own event names it
            nbytes = sum(math.prod(s) for s in shape) * size
        elif dtype in _DTYPE_BYTES and isinstance(shape, list):
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        else:
            continue
        best = max(best, nbytes)
    return best


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """``with count_collectives() as counts: ...`` fills ``counts`` (calls and ``counts.bytes``) when the block ends."""
    counts = CollectiveCount()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield counts
    events = list(prof.events())
    for index, event in enumerate(events):
        name = event.name
        if name.startswith("c10d::") and not name.startswith("c10d::wait"):
            op = name.removeprefix("c10d::")
            counts[op] += 1
            counts.bytes[op] += _payload_bytes(events, index)
