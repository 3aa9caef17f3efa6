"""bitcompile.data.corpus: real English documents, split by document, tokenized into blocks."""

import gzip

import pytest
import torch

from bitcompile.data.corpus import (
    CorpusError,
    TextDocument,
    batches,
    installed_package_readmes,
    read_text_folder,
    split_by_document,
    token_blocks,
)


@pytest.fixture(scope="module")
def readmes():
    return installed_package_readmes()


def test_installed_readmes_are_real_unique_documents(readmes):
    names = [d.name for d in readmes]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "torch" in names and len(readmes) >= 10  # the test extra alone installs dozens
    assert all(len(d.text) >= 2000 for d in readmes)
    assert len({d.text for d in readmes}) == len(readmes)


def test_split_is_by_document_and_deterministic(readmes):
    split = split_by_document(readmes, held_out_fraction=0.2)
    train_names = {d.name for d in split.train}
    held_names = {d.name for d in split.held_out}
    assert not train_names & held_names and train_names | held_names == {d.name for d in readmes}
    assert len(held_names) == round(0.2 * len(readmes))
    # Reading order does not matter; a document keeps its side when others are added or removed.
    again = split_by_document(list(reversed(readmes)), held_out_fraction=0.2)
    assert again == split
    fewer = split_by_document(readmes[1:], held_out_fraction=0.2)
    moved = {d.name for d in fewer.held_out} - held_names
    assert len(moved) <= 1  # at most the one that filled the freed slot
    assert split_by_document(readmes, 0.2, seed=1).held_out != split.held_out


def test_split_rejects_what_it_cannot_split():
    with pytest.raises(CorpusError, match="at least 2 documents"):
        split_by_document([TextDocument("a", "x")])
    with pytest.raises(CorpusError, match="unique"):
        split_by_document([TextDocument("a", "x"), TextDocument("a", "y")])
    with pytest.raises(CorpusError, match="between 0 and 1"):
        split_by_document([TextDocument("a", "x"), TextDocument("b", "y")], held_out_fraction=1.0)


def test_read_text_folder(readmes, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.rst.txt").write_text(readmes[0].text)
    (tmp_path / "a.md.gz").write_bytes(gzip.compress(readmes[1].text.encode()))
    (tmp_path / "short.txt").write_text("stub")
    (tmp_path / "c.html").write_text(readmes[2].text)
    (tmp_path / "skip.txt").write_text(readmes[3].text)
    documents = read_text_folder(tmp_path, exclude=["skip.*"])
    assert [(d.name, d.text) for d in documents] == [("a.md.gz", readmes[1].text), ("sub/b.rst.txt", readmes[0].text)]
    with pytest.raises(CorpusError, match="does not exist"):
        read_text_folder(tmp_path / "missing")
    with pytest.raises(CorpusError, match="no text documents"):
        read_text_folder(tmp_path / "sub", suffixes=(".tex",))


def test_blocks_and_resumable_batches():
    tokens = torch.arange(1000)
    blocks = token_blocks(tokens, 64)
    assert blocks.shape == (15, 64) and torch.equal(blocks[1], torch.arange(64, 128))
    spread = token_blocks(tokens, 64, max_blocks=3)
    assert torch.equal(spread[:, 0], torch.tensor([0, 448, 896]))  # first, middle and last block
    with pytest.raises(CorpusError, match="do not fill one block"):
        token_blocks(torch.arange(10), 64)
    stream = batches(blocks, batch_size=4, seed=3)
    first_ten = [next(stream) for _ in range(10)]  # crosses epochs (3 batches per epoch)
    assert all(b.shape == (4, 64) for b in first_ten)
    epoch = torch.cat(first_ten[:3]).flatten()
    assert len(set(epoch.tolist())) == 12 * 64  # no block twice within an epoch
    resumed = batches(blocks, batch_size=4, seed=3, start_step=7)
    assert all(torch.equal(next(resumed), b) for b in first_ten[7:])
