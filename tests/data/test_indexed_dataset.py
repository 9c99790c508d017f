"""Megatron's .bin/.idx layout, checked against an independent reader written here from the format description."""

import os
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


def test_merge_copies_only_the_sequences_bytes(tmp_path):
    """The merged pointers follow from the lengths, so bytes of a part's .bin past its last sequence, or between two
    of its sequences, must not be copied: they shifted every later sequence of the merged file."""
    padded, gapped = str(tmp_path / "padded"), str(tmp_path / "gapped")
    for prefix, docs in ((padded, [[1, 2, 3], [4, 5]]), (gapped, [[6, 7], [8]])):
        with ix.IndexedDatasetWriter(prefix, np.uint16) as writer:
            for doc in docs:
                writer.add_document(doc)
    with open(f"{padded}.bin", "ab") as fh:
        fh.write(np.array([99, 99], dtype=np.uint16).tobytes())  # past the last sequence
    np.array([6, 7, 99, 8], dtype=np.uint16).tofile(f"{gapped}.bin")  # a token between the two sequences
    raw = bytearray(open(f"{gapped}.idx", "rb").read())
    pointer = 34 + 4 * 2 + 8  # header, two int32 lengths, then the second int64 byte offset
    raw[pointer:pointer + 8] = np.array([6], dtype=np.int64).tobytes()
    open(f"{gapped}.idx", "wb").write(bytes(raw))
    assert ix.IndexedDataset(gapped).get(1).tolist() == [8] and not ix.IndexedDataset(gapped).is_contiguous()
    ix.merge([padded, gapped, padded], str(tmp_path / "all"))
    merged = ix.IndexedDataset(str(tmp_path / "all"))
    merged.check_layout()
    assert [merged.get(i).tolist() for i in range(len(merged))] == [[1, 2, 3], [4, 5], [6, 7], [8], [1, 2, 3], [4, 5]]
    assert os.path.getsize(str(tmp_path / "all") + ".bin") == 13 * 2


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


def _write_raw(prefix, lengths, pointers, documents, bin_tokens=16):
    """An .idx written byte by byte from the format description, whatever its content."""
    np.arange(bin_tokens, dtype=np.uint16).tofile(f"{prefix}.bin")
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, len(lengths), len(documents)))
        for values, dtype in ((lengths, "<i4"), (pointers, "<i8"), (documents, "<i8")):
            fh.write(np.array(values, dtype).tobytes())
    return prefix


@pytest.mark.parametrize("lengths, pointers, documents, on_open, message", [
    # documents must run from 0 to the sequence count: checked on every open (O(1))
    ([2, 3], [0, 4], [1, 2], True, r"document indices must run from 0 to the sequence count 2 \(found 1\.\.2"),
    ([2, 3], [0, 4], [], True, r"document indices must run from 0 to the sequence count 2 \(found none"),
    # the rest needs the whole index: check_layout (the index build, inspect, merge)
    ([2, 3, 1], [0, 4, 10], [0, 2, 1, 3], False, r"document indices decrease at document 1 \(2 then 1\)"),
    ([2, -1, 1], [0, 4, 2], [0, 1, 2, 3], False, r"sequence 1 \(length -1, byte offset 4\) does not lie inside"),
    ([2, 3, 1], [0, 40, 8], [0, 1, 2, 3], False, r"sequence 1 \(length 3, byte offset 40\) does not lie inside"),
])
def test_an_inconsistent_index_is_refused(tmp_path, lengths, pointers, documents, on_open, message):
    """Sizes that agree are not enough: an index whose documents drop sequences or run backwards, or whose
    sequences have negative lengths or point outside the .bin, used to open and fail (or serve wrong tokens) only
    when a sample was read, in a loader worker mid-training."""
    prefix = _write_raw(str(tmp_path / "bad"), lengths, pointers, documents)
    if on_open:
        with pytest.raises(ix.IndexedDatasetError, match=message):
            ix.IndexedDataset(prefix)
        return
    dataset = ix.IndexedDataset(prefix)
    with pytest.raises(ix.IndexedDatasetError, match=message):
        dataset.check_layout()
    with pytest.raises(ix.IndexedDatasetError, match=message):
        ix.merge([prefix], str(tmp_path / "merged"))
    assert not list(tmp_path.glob("merged*"))
    good = _write_raw(str(tmp_path / "good"), [2, 3, 1], [0, 4, 10], [0, 1, 3])
    ix.IndexedDataset(good).check_layout()


def test_the_index_build_checks_the_layout(tmp_path):
    from megatron_mega.data.documents import DocumentSource
    from megatron_mega.data.gpt_dataset import GPTDataset
    from megatron_mega.data.index_cache import IndexCache

    prefix = _write_raw(str(tmp_path / "bad"), [2, -1, 5], [0, 4, 2], [0, 1, 2, 3])
    with pytest.raises(ix.IndexedDatasetError, match=r"sequence 1 \(length -1"):
        GPTDataset(DocumentSource(prefix), range(0, 3), 2, 4, 0, IndexCache(str(tmp_path / "cache")), "train")


def test_one_sequence_documents_is_read_block_by_block(tmp_path):
    """data_prep's layout (a document is one sequence) is told apart from Megatron's multi-sequence documents a
    block at a time, the block boundaries included."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    with ix.IndexedDatasetWriter(single, np.uint16) as writer:
        for d in range(10):
            writer.add_sequence([d + 1] * 3)
            writer.end_document()
    with ix.IndexedDatasetWriter(multi, np.uint16) as writer:
        for d in range(10):
            writer.add_sequence([d + 1] * 3)
            if d != 6:
                writer.end_document()  # documents 6 and 7 become one document of two sequences
    for block in (1, 2, 3, 4, 1 << 22):
        assert ix.IndexedDataset(single).one_sequence_documents(block) is True
    empty_doc = str(tmp_path / "empty")  # as many documents as sequences, one of them empty, one of two sequences
    with ix.IndexedDatasetWriter(empty_doc, np.uint16) as writer:
        writer.end_document()
        writer.add_sequence([1])
        writer.add_sequence([2])
        writer.end_document()
    for block in (1, 2, 3, 1 << 22):
        assert ix.IndexedDataset(multi).one_sequence_documents(block) is False
        assert ix.IndexedDataset(empty_doc).one_sequence_documents(block) is False
