"""Which bitcompile Python functions run while a call runs: the check that a compiled decode
step runs no bitcompile Python per layer (tests/test_compiled_decode.py, test_aoti_decode.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def bitcompile_frames(fn: Callable[[], object]) -> list[str]:
    """``file:function`` of every bitcompile Python frame entered while ``fn()`` runs."""
    seen = []

    def profile(frame, event, arg):
        if event == "call" and "/bitcompile/" in frame.f_code.co_filename.replace("\\", "/"):
            seen.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen
