import contextlib
import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile limits leak between tests."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def log_records():
    """``with log_records("torch.x") as records:`` collects what that logger emits in the block.

    Its own handler on the named logger, not caplog's root handler: torch's loggers need not
    propagate to the root.
    """

    @contextlib.contextmanager
    def capture(name: str):
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = records.append
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            yield records
        finally:
            logger.removeHandler(handler)

    return capture
