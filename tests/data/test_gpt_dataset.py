"""Packing documents into seq_len + 1 samples, the epoch/shuffle indices, and the split by documents."""

import os
import pickle

import numpy as np
import pytest

from megatron_mega.data import gpt_dataset
from megatron_mega.data.documents import DocumentSource
from megatron_mega.data.gpt_dataset import DatasetError, GPTDataset, build_gpt_indices, split_document_ranges
from megatron_mega.data.index_cache import IndexCache
from megatron_mega.data.indexed_dataset import IndexedDatasetWriter
from tests.data.fixtures import EOS, index_digest, make_manifest, random_documents


def megatron_sample_index(sizes, document_index, seq_length, num_samples):
    """Megatron's build_sample_idx (megatron/core/datasets/helpers.cpp), transcribed loop for loop."""
    sample_index = [(0, 0)]
    doc_idx_index, doc_offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[document_index[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_index.append((doc_idx_index, doc_offset))
    return np.asarray(sample_index)


@pytest.fixture
def source(tmp_path):
    docs = random_documents(37, seed=1)
    docs[5] = np.zeros(0, dtype=np.int64)  # an empty document is skipped, as Megatron does
    return DocumentSource(make_manifest(tmp_path / "ds", docs, shards=3))


def test_samples_tile_the_shuffled_document_stream(source, tmp_path):
    seq_len, wanted = 16, 150
    ds = GPTDataset(source, range(0, source.num_documents), seq_len, wanted, seed=7, cache=IndexCache(str(tmp_path)))
    documents = source.num_documents
    tokens_per_epoch = int(source.document_lengths().sum())
    epochs = ds.num_epochs
    assert len(ds) >= wanted > ((epochs - 1) * tokens_per_epoch - 1) // seq_len  # just enough epochs
    for e in range(epochs):  # each epoch: every document once, freshly shuffled
        block = np.asarray(ds.document_index[e * documents:(e + 1) * documents])
        assert sorted(block) == list(range(documents))
    assert not np.array_equal(ds.document_index[:documents], ds.document_index[documents:2 * documents])
    stream = np.concatenate([source.get(int(d)) for d in ds.document_index]).astype(np.int64)
    for p in range(len(ds)):  # sample p covers stream tokens [p*L, (p+1)*L]: L + 1 tokens, one shared with p + 1
        assert np.array_equal(ds.stream_sample(p), stream[p * seq_len:(p + 1) * seq_len + 1])
    pieces = [ds.stream_sample(p)[:-1] for p in range(len(ds))] + [ds.stream_sample(len(ds) - 1)[-1:]]
    assert np.array_equal(np.concatenate(pieces), stream[:len(ds) * seq_len + 1])
    lengths = source.document_lengths()
    assert np.array_equal(ds.sample_index, megatron_sample_index(lengths, ds.document_index, seq_len, len(ds)))
    shuffle = np.asarray(ds.shuffle_index)
    assert sorted(shuffle) == list(range(len(ds))) and not np.array_equal(shuffle, np.arange(len(ds)))
    # the samples ending in epoch 0 (their last token in it) are all served before the others
    first_epoch = -(-tokens_per_epoch // seq_len) - 1
    assert sorted(shuffle[:first_epoch]) == list(range(first_epoch))
    for j in (0, 1, len(ds) - 1, -1):
        assert np.array_equal(ds[j]["tokens"], ds.stream_sample(int(shuffle[j])))
        assert ds[j]["tokens"].dtype == np.int64 and len(ds[j]["tokens"]) == seq_len + 1


def test_more_samples_append_epochs_without_reordering(source, tmp_path):
    cache = IndexCache(str(tmp_path))
    short = GPTDataset(source, range(0, source.num_documents), 8, 40, seed=3, cache=cache)
    long = GPTDataset(source, range(0, source.num_documents), 8, 400, seed=3, cache=cache)
    assert long.num_epochs > short.num_epochs + 1
    n = len(short.document_index)
    assert np.array_equal(long.document_index[:n], short.document_index)
    # every sample of the short run, its last epoch included, in the same order: a run resumed with more steps
    # serves the rest of the epoch it was in (version 1 reshuffled that epoch)
    assert np.array_equal(long.shuffle_index[:len(short.shuffle_index)], short.shuffle_index)
    tokens = int(source.document_lengths().sum())
    for epochs in range(1, long.num_epochs + 2):  # every sample of `epochs` whole epochs, fewer and more than long's
        other = GPTDataset(source, range(0, source.num_documents), 8, (epochs * tokens - 1) // 8, seed=3, cache=cache)
        assert other.num_epochs == epochs
        n = min(len(other.shuffle_index), len(long.shuffle_index))
        assert np.array_equal(long.shuffle_index[:n], other.shuffle_index[:n])


def test_indices_are_deterministic_and_seeded(source, tmp_path):
    a = GPTDataset(source, range(0, 30), 16, 50, seed=1, cache=IndexCache(str(tmp_path / "a")))
    b = GPTDataset(source, range(0, 30), 16, 50, seed=1, cache=IndexCache(str(tmp_path / "b")))
    c = GPTDataset(source, range(0, 30), 16, 50, seed=2, cache=IndexCache(str(tmp_path / "b")))
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    lengths = source.document_lengths(0, 30)
    direct = build_gpt_indices(lengths, 0, 16, 50, seed=1, stream=int(source.identity[:15], 16))
    assert all(np.array_equal(direct[k], a.indices.arrays[k]) for k in direct)


def test_split_ranges_follow_megatron_rounding():
    assert [(r.start, r.stop) for r in split_document_ranges(1000, (0.969, 0.03, 0.001))] == [(0, 969), (969, 999),
                                                                                             (999, 1000)]
    assert [len(r) for r in split_document_ranges(10, (0.5, 0.5, 0.0))] == [5, 5, 0]
    for n in range(0, 40):
        ranges = split_document_ranges(n, (0.8, 0.15, 0.05))
        assert ranges[0].start == 0 and ranges[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


def test_a_split_without_documents_is_refused(tmp_path):
    source = DocumentSource(make_manifest(tmp_path / "ds", random_documents(5)))
    with pytest.raises(DatasetError, match=r"\(valid\): the split gives this dataset no documents"):
        GPTDataset(source, range(5, 5), 8, 10, seed=0, cache=IndexCache(str(tmp_path)), split="valid")


def test_bare_prefix_with_multi_sequence_documents(tmp_path):
    """A Megatron file (no manifest) whose documents are several sequences: they read as one document each."""
    prefix = str(tmp_path / "megatron")
    sequences = [[10, 11], [12], [13, 14, 15], [EOS], [16, 17, 18, 19, EOS], [20], [21, EOS]]
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for group in ([0, 1], [2, 3], [4], [5, 6]):
            for s in group:
                writer.add_sequence(sequences[s])
            writer.end_document()
    source = DocumentSource(prefix)
    assert source.manifest is None and source.num_documents == 4
    assert source.get(0).tolist() == [10, 11, 12] and source.get(1, 1, 3).tolist() == [14, 15, EOS]
    assert source.document_lengths().tolist() == [3, 4, 5, 3]
    ds = GPTDataset(source, range(0, 4), 4, 6, seed=0, cache=IndexCache(str(tmp_path / "c")))
    stream = np.concatenate([source.get(int(d)) for d in ds.document_index])
    assert all(np.array_equal(ds.stream_sample(p), stream[p * 4:p * 4 + 5]) for p in range(len(ds)))


def test_pickles_by_path_not_by_value(source, tmp_path):
    """DataLoader workers started with spawn receive the dataset pickled: memory maps must not travel."""
    ds = GPTDataset(source, range(0, 37), 16, 2000, seed=1, cache=IndexCache(str(tmp_path)))
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 < ds.sample_index.nbytes
    copy = pickle.loads(blob)
    assert all(np.array_equal(copy[i]["tokens"], ds[i]["tokens"]) for i in (0, 5, len(ds) - 1))


def test_chunked_build_matches_one_chunk(monkeypatch):
    from megatron_mega.data import gpt_dataset

    lengths = np.random.RandomState(0).randint(0, 30, size=23)
    whole = build_gpt_indices(lengths, 100, 8, 500, seed=1, stream=5)
    monkeypatch.setattr(gpt_dataset, "_CHUNK", 7)  # one epoch per chunk (more documents than entries)
    assert all(np.array_equal(whole[k], v) for k, v in build_gpt_indices(lengths, 100, 8, 500, 1, 5).items())
    monkeypatch.setattr(gpt_dataset, "_CHUNK", 50)  # two epochs per chunk
    assert all(np.array_equal(whole[k], v) for k, v in build_gpt_indices(lengths, 100, 8, 500, 1, 5).items())


def test_empty_documents_are_refused_and_nothing_is_cached(tmp_path):
    docs = [np.zeros(0, dtype=np.int64)] * 4 + [np.arange(1, 6)]
    source = DocumentSource(make_manifest(tmp_path / "ds", docs, shards=2))
    with pytest.raises(DatasetError, match=r"documents 0\.\.3 are empty"):
        GPTDataset(source, range(0, 4), 4, 10, seed=0, cache=IndexCache(str(tmp_path / "cache")))
    assert not [name for name in os.listdir(tmp_path / "cache") if not name.endswith(".lock")]


def test_token_counts_sum_across_shards_without_copying_the_lengths(source):
    """The natural blend weights come from token_count: every document range, shard boundaries included."""
    lengths = source.document_lengths()
    n = source.num_documents
    for start, stop in ((0, n), (0, 1), (3, n - 2), (n // 3, 2 * n // 3 + 1), (5, 5)):
        assert source.token_count(start, stop) == int(lengths[start:stop].sum())
    # a whole shard's count is the manifest's: its lengths are not read (every process asks, for natural weights)
    first, last = int(source._starts[1]), int(source._starts[2])

    class Unread:
        def __getitem__(self, key):
            raise AssertionError("shard 1's lengths were read")

    source._lengths[1] = Unread()
    assert source.token_count(first - 2, last + 1) == int(lengths[first - 2:last + 1].sum())


def test_indices_of_this_version_never_change():
    """INDEX_VERSION keys the cache, so a cache built by an earlier release of this version is reused: the build may
    get faster or leaner (it shuffles in place in memory-mapped files since the digests were taken, with
    rng.permutation before) but never give other indices. Two epochs and more, an empty document, one-sample blocks."""
    lengths = np.random.RandomState(0).randint(0, 40, size=37)
    assert gpt_dataset.INDEX_VERSION == 2
    assert index_digest(build_gpt_indices(lengths, 11, 16, 300, seed=3, stream=7)) == "3946186afcd56396"
    assert index_digest(build_gpt_indices(np.array([5, 0, 9, 2]), 0, 64, 3, seed=1, stream=2)) == "8c65996d07be986d"


def test_cached_build_equals_the_in_memory_build(source, tmp_path):
    """Through the cache the arrays are written straight into memory-mapped files, and the lengths are int32."""
    cached = GPTDataset(source, range(2, 30), 8, 400, seed=4, cache=IndexCache(str(tmp_path / "cache")))
    direct = build_gpt_indices(source.document_lengths(2, 30), 2, 8, 400, seed=4, stream=int(source.identity[:15], 16))
    assert cached.num_epochs > 1 and sorted(direct) == sorted(cached.indices.arrays)
    for name, array in direct.items():
        assert cached.indices.arrays[name].dtype == array.dtype and np.array_equal(cached.indices.arrays[name], array)


def test_document_lengths_in_a_narrower_type_only_when_they_fit(source):
    lengths = source.document_lengths()
    narrow = source.document_lengths(3, 30, dtype=np.int32)
    assert narrow.dtype == np.int32 and np.array_equal(narrow, lengths[3:30])
    # a document of several sequences can pass 2^31 - 1 tokens: then the counts stay int64
    source._lengths = [np.asarray(part, dtype=np.int64) for part in source._lengths]
    source._lengths[0][1] = 2 ** 31
    wide = source.document_lengths(0, 30, dtype=np.int32)
    assert wide.dtype == np.int64 and wide[1] == 2 ** 31 and np.array_equal(wide[2:], lengths[2:30])
