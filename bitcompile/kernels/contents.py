"""What a tensor held when something was derived from it, to tell later whether it changed.

Why: compiled graphs fold weights into constants (``freeze=True``, the Ascend weights
prepared from packed buffers), and a tensor's version counter misses writes:
``p.data.copy_(w)`` (``.data`` has a counter of its own), ``p.data = w``, and any in-place
change of an inference tensor (no counter at all, e.g. ``load_state_dict`` under
``torch.inference_mode()``). :func:`contents_of` keeps a copy-on-write clone of the tensor
(``torch._lazy_clone``: no bytes are copied). The tensor and the clone share one storage until
something obtains a writable pointer to it, when torch copies it and the sharing ends, so
"still copy-on-write" (``torch._C._is_cow_tensor``, ~0.2 µs) proves that nothing was written.
Once the sharing has ended, the tensor is compared with the clone, which kept the old values:
equal (a writable pointer was taken but nothing written) → shared again; different → a new
``generation``. Where a storage cannot be shared (memory from numpy or a file mapping), the
clone is a real copy, compared on every check. Writes through a raw pointer taken before
(a numpy view, DLPack) stay invisible.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

# without it (an older torch) every snapshot is a real copy, compared on every call
is_cow_tensor = getattr(torch._C, "_is_cow_tensor", lambda tensor: False)


def _snapshot(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The contents of ``tensor`` kept for later comparison: a copy-on-write clone (no bytes
    copied; ``tensor`` becomes copy-on-write too), or a real copy where torch cannot share the storage."""
    source = tensor.detach()
    try:
        clone = torch._lazy_clone(source)
    except (RuntimeError, AttributeError):  # a storage torch cannot share (numpy, mmap), or an older torch
        return source.clone(), False
    return clone, is_cow_tensor(source)


def _same_contents(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())  # NaN == NaN here


class Contents:
    """The contents of one watched tensor, shared by everything derived from it (frozen graphs'
    guards, the Ascend weights prepared from packed buffers).

    ``snapshot``: a copy-on-write clone sharing the tensor's storage (``cow``), or a real copy
    where torch cannot share it. ``generation`` counts the different contents seen: a guard
    folded generation g serves only while it is still g. One record per tensor, because a
    storage that is copy-on-write says that nobody wrote since *some* guard last shared it,
    not which one: a graph frozen after a write (another input shape, say) shares the new
    values, and the older graph must still see that they are not the ones it folded.
    """

    __slots__ = ("snapshot", "cow", "generation", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.generation = 0
        self.snapshot, self.cow = _snapshot(tensor)

    def refresh(self, tensor: torch.Tensor) -> None:
        """``tensor``'s storage is no longer shared with the snapshot (or never was): compare, share again."""
        changed = not _same_contents(tensor.detach(), self.snapshot)
        if changed:
            self.generation += 1
        if changed or self.cow:  # (a real copy of unchanged values is kept: compared on every call)
            self.snapshot, self.cow = _snapshot(tensor)


# watched tensor -> weakref to its Contents; both held weakly: the record lives as long as a
# guard that uses it, so the snapshot (after a write, a second copy of the values) goes with the graphs
_CONTENTS = WeakIdKeyDictionary()


def contents_of(tensor: torch.Tensor) -> Contents:
    """The record of ``tensor`` (made now if none is alive), with ``generation`` up to date:
    whatever is derived from ``tensor`` now belongs to that generation."""
    ref = _CONTENTS.get(tensor)
    record = ref() if ref is not None else None
    if record is None:
        record = Contents(tensor)
        _CONTENTS[tensor] = weakref.ref(record)
    elif not (record.cow and is_cow_tensor(tensor)):
        record.refresh(tensor)  # written since another graph folded it? then a new generation
    return record
