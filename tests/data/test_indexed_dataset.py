"""Megatron's .bin/.idx layout, checked against an independent reader written here from the format description."""

import struct

import numpy as np
import pytest

from megatron_mega.data import indexed_dataset as ix


def independent_read(prefix):
    """Parse the files with struct only, following ../shared/reference/megatron-indexed-format.md."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, count, doc_len = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1
    offset = 9 + 8 + 1 + 8 + 8
    lengths = struct.unpack_from(f"<{count}i", raw, offset)
    offset += 4 * count
    pointers = struct.unpack_from(f"<{count}q", raw, offset)
    offset += 8 * count
    documents = struct.unpack_from(f"<{doc_len}q", raw, offset)
    assert offset + 8 * doc_len == len(raw)
    fmt, size = {1: ("B", 1), 4: ("i", 4), 8: ("H", 2)}[code]
    data = open(f"{prefix}.bin", "rb").read()
    sequences = [list(struct.unpack_from(f"<{n}{fmt}", data, p)) for n, p in zip(lengths, pointers)]
    return code, list(documents), sequences


@pytest.mark.parametrize("vocab, code", [(32000, 8), (65499, 8), (65500, 4), (250000, 4)])
def test_writer_matches_the_layout(tmp_path, vocab, code):
    dtype = ix.token_dtype_for_vocab(vocab)
    docs = [[5, 6, 7, vocab - 1], [1], [vocab - 2, 3, 2]]
    prefix = str(tmp_path / "ds")
    with ix.IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    got_code, documents, sequences = independent_read(prefix)
    assert got_code == code and documents == [0, 1, 2, 3] and sequences == docs
    reader = ix.IndexedDataset(prefix)
    assert [reader[i].tolist() for i in range(len(reader))] == docs
    assert reader.get(0, 1, 2).tolist() == [6, 7] and reader.num_tokens == 8


def test_reads_multi_sequence_documents_written_independently(tmp_path):
    """A Megatron file with sentence-split documents (several sequences each), written here by hand."""
    seqs = [[1, 2], [3], [4, 5, 6], [7]]
    docs = [0, 2, 4]
    prefix = str(tmp_path / "m")
    with open(f"{prefix}.bin", "wb") as fh:
        fh.write(np.asarray(sum(seqs, []), dtype=np.uint16).tobytes())
    pointers = np.cumsum([0] + [2 * len(s) for s in seqs[:-1]])
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(seqs), len(docs)))
        fh.write(struct.pack(f"<{len(seqs)}i", *map(len, seqs)))
        fh.write(struct.pack(f"<{len(seqs)}q", *pointers))
        fh.write(struct.pack(f"<{len(docs)}q", *docs))
    reader = ix.IndexedDataset(prefix)
    assert reader.num_documents == 2 and list(reader.document_sequences(1)) == [2, 3]
    assert [reader[i].tolist() for i in range(4)] == seqs


def test_merge_follows_megatron_rule(tmp_path):
    parts = []
    for p, docs in enumerate([[[1, 2, 3], [4]], [[5], [6, 7]], [[8, 9]]]):
        prefix = str(tmp_path / f"p{p}")
        with ix.IndexedDatasetWriter(prefix, np.uint16) as writer:
            for doc in docs:
                writer.add_document(doc)
        parts.append(prefix)
    ix.merge(parts, str(tmp_path / "all"))
    code, documents, sequences = independent_read(str(tmp_path / "all"))
    assert documents == [0, 1, 2, 3, 4, 5]
    assert sequences == [[1, 2, 3], [4], [5], [6, 7], [8, 9]]


def test_failed_write_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with ix.IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_files_give_clear_errors(tmp_path):
    prefix = str(tmp_path / "c")
    with ix.IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
    raw = open(f"{prefix}.idx", "rb").read()
    open(f"{prefix}.idx", "wb").write(raw[:-4])
    with pytest.raises(ix.IndexedDatasetError, match=r"c.idx: truncated"):
        ix.IndexedDataset(prefix)
    open(f"{prefix}.idx", "wb").write(b"NOTMAGIC!" + raw[9:])
    with pytest.raises(ix.IndexedDatasetError, match="magic"):
        ix.IndexedDataset(prefix)
    open(f"{prefix}.idx", "wb").write(raw)
    open(f"{prefix}.bin", "wb").write(b"\x00")
    with pytest.raises(ix.IndexedDatasetError, match=r"c.bin: truncated"):
        ix.IndexedDataset(prefix)
