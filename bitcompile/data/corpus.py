"""Real human-written English for training and evaluating language models, split by document.

Two sources, both on disk (nothing is downloaded):

* :func:`read_text_folder`: every text file under a folder, one document per file. The
  recipe's corpus is Debian's ``python3-doc`` (``apt-get install python3-doc``): the Python
  documentation's reStructuredText sources, found by :func:`python_docs_folder`.
* :func:`installed_package_readmes`: the long descriptions (READMEs) that installed Python
  distributions carry in their ``METADATA``, one document per distribution. Always present
  after ``pip install``, so the tests use it.

:func:`split_by_document` puts whole documents on either side (text from one document never
leaks into the held-out set), deterministically; :func:`tokenize_documents` and
:func:`token_blocks` turn them into fixed-length blocks of token ids.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.metadata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Suffixes :func:`read_text_folder` reads by default (Sphinx's ``_sources`` are ``*.rst.txt``).
TEXT_SUFFIXES = (".txt", ".rst", ".md")


class CorpusError(ValueError):
    """A corpus could not be read or split as asked."""


@dataclass(frozen=True)
class TextDocument:
    """One document: ``name`` identifies it (a relative path, a distribution name) and decides its split."""

    name: str
    text: str


@dataclass(frozen=True)
class CorpusSplit:
    """Documents on each side of a by-document split."""

    train: list[TextDocument]
    held_out: list[TextDocument]

    def describe(self) -> dict[str, int]:
        """Document and character counts per side."""
        return {
            "train_documents": len(self.train),
            "held_out_documents": len(self.held_out),
            "train_chars": sum(len(d.text) for d in self.train),
            "held_out_chars": sum(len(d.text) for d in self.held_out),
        }


def python_docs_folder() -> Path:
    """The Python documentation sources installed by Debian's ``python3-doc`` package.

    Raises:
        CorpusError: the package is not installed (with the command that installs it).
    """
    candidates = sorted(glob.glob("/usr/share/doc/python3.*/html/_sources"), reverse=True)
    for candidate in candidates:
        if any(Path(candidate).glob("tutorial/*.txt")):
            return Path(candidate)
    raise CorpusError(
        "the Python documentation sources (/usr/share/doc/python3.*/html/_sources) are missing: "
        "apt-get install python3-doc"
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def read_text_folder(
    folder: str | Path,
    suffixes: Sequence[str] = TEXT_SUFFIXES,
    min_chars: int = 200,
    exclude: Sequence[str] = (),
) -> list[TextDocument]:
    """Every file under ``folder`` whose name ends with one of ``suffixes`` (``.gz`` allowed), one document each.

    Documents are named by their path relative to ``folder`` and sorted by it; files shorter
    than ``min_chars`` (index pages, stubs) and files matching an ``exclude`` glob (on the
    relative path) are skipped.

    Raises:
        CorpusError: the folder does not exist or holds no such document.
    """
    root = Path(folder)
    if not root.is_dir():
        raise CorpusError(f"corpus folder {str(root)!r} does not exist")
    documents = []
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        bare = name[:-3] if name.endswith(".gz") else name
        if not path.is_file() or not bare.endswith(tuple(suffixes)):
            continue
        if any(Path(name).match(pattern) for pattern in exclude):
            continue
        text = _read_text(path)
        if len(text) >= min_chars:
            documents.append(TextDocument(name, text))
    if not documents:
        raise CorpusError(f"corpus folder {str(root)!r} has no text documents ({', '.join(suffixes)}) of {min_chars}+ chars")
    return documents


def installed_package_readmes(min_chars: int = 2000) -> list[TextDocument]:
    """The READMEs (``METADATA`` long descriptions) of the installed Python distributions.

    One document per distribution, named by its normalized name and sorted by it; exact
    duplicates (the same README under two names) are kept once, and of two installed versions
    of one distribution (a venv can hold stale metadata, e.g. of an upgraded setuptools) the
    first on ``sys.path`` wins, as it does for ``import``. Which documents exist depends
    on what is installed; every split of a given document is the same everywhere.

    Raises:
        CorpusError: no installed distribution has a README of ``min_chars``+ characters.
    """
    seen: set[str] = set()
    names: set[str] = set()
    documents = []
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata.get("Name") or "").lower().replace("_", "-")
        body = distribution.metadata.get_payload() or distribution.metadata.get("Description") or ""
        body = body.strip()
        digest = hashlib.sha256(body.encode()).hexdigest()
        if not name or name in names or len(body) < min_chars or digest in seen:
            continue
        seen.add(digest)
        names.add(name)
        documents.append(TextDocument(name, body))
    documents.sort(key=lambda d: d.name)
    if not documents:
        raise CorpusError(f"no installed distribution has a README of {min_chars}+ characters")
    return documents


def _split_key(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_by_document(documents: Sequence[TextDocument], held_out_fraction: float = 0.1, seed: int = 0) -> CorpusSplit:
    """Split whole documents into train and held-out, deterministically.

    Documents are ordered by a hash of ``(seed, name)`` and the first
    ``max(1, round(fraction * n))`` are held out, so the split depends only on the names: the
    same document lands on the same side whatever order it was read in.

    Raises:
        CorpusError: fewer than 2 documents, duplicate names, or a fraction outside (0, 1).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise CorpusError(f"held_out_fraction={held_out_fraction!r} must be between 0 and 1 (exclusive)")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        raise CorpusError("document names must be unique: they decide the split")
    if len(documents) < 2:
        raise CorpusError(f"a by-document split needs at least 2 documents, got {len(documents)}")
    ordered = sorted(documents, key=lambda d: _split_key(d.name, seed))
    held_count = min(len(documents) - 1, max(1, round(held_out_fraction * len(documents))))
    held_out = sorted(ordered[:held_count], key=lambda d: d.name)
    train = sorted(ordered[held_count:], key=lambda d: d.name)
    return CorpusSplit(train=train, held_out=held_out)


def tokenize_documents(documents: Iterable[TextDocument], tokenizer: Any, separator_id: int | None = None) -> torch.Tensor:
    """All documents' token ids, concatenated in order, each followed by ``separator_id``.

    ``tokenizer`` is a ``transformers`` tokenizer; ``separator_id`` defaults to its EOS token
    (a model trained on this stream learns where documents end, not to continue across them).
    """
    if separator_id is None:
        separator_id = tokenizer.eos_token_id
    pieces: list[list[int]] = []
    for document in documents:
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        pieces.append(list(ids) + ([separator_id] if separator_id is not None else []))
    return torch.tensor([token for piece in pieces for token in piece], dtype=torch.long)


def token_blocks(tokens: torch.Tensor, block_length: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(n, block_length)`` blocks of a 1-D token stream (the incomplete tail is dropped).

    With ``max_blocks``, that many blocks evenly spaced over the whole stream (a held-out
    sample that covers every document, not only the first ones).

    Raises:
        CorpusError: the stream is shorter than one block.
    """
    if block_length < 2:
        raise CorpusError(f"block_length={block_length} must be at least 2 (an input and a next token)")
    count = tokens.numel() // block_length
    if count == 0:
        raise CorpusError(f"{tokens.numel()} tokens do not fill one block of {block_length}")
    blocks = tokens[: count * block_length].view(count, block_length)
    if max_blocks is not None and max_blocks < count:
        index = torch.linspace(0, count - 1, max_blocks).round().long()
        blocks = blocks[index]
    return blocks


def batches(blocks: torch.Tensor, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[torch.Tensor]:
    """An endless stream of ``(batch_size, block_length)`` training batches, reshuffled every epoch.

    The order depends only on ``seed`` and the step, so a run resumed at ``start_step`` sees
    exactly the batches an uninterrupted run would have seen from that step on.
    """
    if batch_size < 1 or batch_size > blocks.shape[0]:
        raise CorpusError(f"batch_size={batch_size} must be between 1 and the number of blocks ({blocks.shape[0]})")
    per_epoch = blocks.shape[0] // batch_size
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield blocks[order[index * batch_size : (index + 1) * batch_size]]
        step += 1
