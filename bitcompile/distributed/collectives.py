"""Count the torch.distributed collectives a block of code issues (with the profiler).

Every collective of a ``ProcessGroup`` goes through a ``c10d::`` dispatcher op
(``c10d::allreduce_``, ``c10d::_allgather_base_``, ``c10d::_reduce_scatter_base_`` ...),
which the PyTorch profiler records; nothing is patched.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from torch.profiler import ProfilerActivity, profile


class CollectiveCount(collections.Counter):
    """``{c10d op name: calls}``; ``.total`` is the sum."""

    @property
    def total(self) -> int:
        return sum(self.values())


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """``with count_collectives() as counts: ...`` fills ``counts`` when the block ends."""
    counts = CollectiveCount()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield counts
    for event in prof.events():
        name = event.name
        if name.startswith("c10d::") and not name.startswith("c10d::wait"):
            counts[name.removeprefix("c10d::")] += 1
