"""GPT-style samples: documents packed back to back into samples of seq_len + 1 tokens, as Megatron's GPTDataset.

Three indices, built once and cached (see index_cache.py):

    document_index  int[E * D]     the split's document ids, each epoch a fresh permutation of all D of them
    sample_index    int[n + 1, 2]  (position in document_index, token offset) where sample i starts; the stream
                                   is the documents of document_index back to back, and sample i covers its
                                   tokens [i * seq_len, (i + 1) * seq_len] inclusive: seq_len + 1 tokens, one
                                   shared with the next sample (its first input is this one's last target)
    shuffle_index   int[n]         the order samples are served in

Where this differs from Megatron, on purpose: Megatron shuffles all full epochs' documents together (and a short
final epoch separately), and shuffles samples likewise. Here each epoch is shuffled on its own, documents and then
the samples that end in it (whose last token is in it), so epoch e's samples are served before epoch e + 1's, and
asking for more samples later appends epochs without reordering the earlier ones, the last included: a run that
resumes with more steps or another data-parallel size keeps its order. E is the fewest epochs giving
`num_samples`. (Version 1 grouped samples by the epoch they start in; the last epoch then held one sample fewer
than once it was followed by another, and its whole order changed when one was added.)

Train/valid/test are disjoint ranges of documents (Megatron's split rounding), so no document is in two splits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_mega.data import seeding
from megatron_mega.data.documents import DocumentSource
from megatron_mega.data.index_cache import Allocate, IndexCache, in_memory

INDEX_VERSION = 2  # bump when the index algorithm changes: it is part of every cache key


class DatasetError(ValueError):
    """A dataset that cannot provide the samples asked of it."""


def split_document_ranges(num_documents: int, fractions: Sequence[float]) -> list[range]:
    """Megatron's rule: cumulative rounded shares, the rounding error taken off every boundary but the first."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [min(max(b - excess, 0), num_documents) for b in bounds[1:]]
    return [range(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs E whose stream (E * T tokens) holds num_samples samples: (E*T - 1) // seq_len >= num_samples."""
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def _epoch_sample_range(first: int, stop: int, tokens_per_epoch: int, seq_len: int, limit: int) -> tuple[int, int]:
    """Samples (or sample boundaries) whose first token lies in epochs [first, stop): ids [ceil(first*T/L),
    ceil(stop*T/L)), clipped to `limit`."""
    lo = -(-first * tokens_per_epoch // seq_len)
    hi = -(-stop * tokens_per_epoch // seq_len)
    return min(lo, limit), min(hi, limit)


def _int_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.int32) if max_value < 2 ** 31 else np.dtype(np.int64)


_CHUNK = 1 << 22  # index entries computed at once: the temporaries stay a few tens of MB at any size


def _fill_arange(out: np.ndarray, start: int) -> None:
    """out[:] = start + arange(len(out)), a chunk at a time (np.arange alone is 8 bytes an entry, at once)."""
    for lo in range(0, len(out), _CHUNK):
        hi = min(len(out), lo + _CHUNK)
        out[lo:hi] = np.arange(start + lo, start + hi, dtype=np.int64)


def build_gpt_indices(lengths: np.ndarray, first_document: int, seq_len: int, num_samples: int, seed: int,
                      stream: int, allocate: Allocate = in_memory) -> dict[str, np.ndarray]:
    """The three indices for documents `first_document + arange(len(lengths))` of token counts `lengths`.

    Each random stream is drawn epoch after epoch, so the indices of an epoch never depend on how many follow it.
    The arrays come from `allocate` (memory-mapped files in a cache) and are shuffled there in place: RandomState's
    shuffle draws the same swaps as its permutation, whatever the array's integer type.
    """
    lengths = np.asarray(lengths)
    num_documents, tokens_per_epoch = len(lengths), int(lengths.sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    stop = first_document + num_documents
    parts = (seed, stream, first_document, stop)

    document_index = allocate("document_index", epochs * num_documents, _int_dtype(stop))
    rng = seeding.random_state(seeding.DOCUMENT_SHUFFLE, *parts)
    for epoch in range(epochs):
        order = document_index[epoch * num_documents:(epoch + 1) * num_documents]
        _fill_arange(order, first_document)
        rng.shuffle(order.view(np.ndarray))  # a memmap subclass would take numpy's slow generic path

    count = (epochs * tokens_per_epoch - 1) // seq_len  # samples; the last needs the token after its last target
    sample_index = allocate("sample_index", (count + 1, 2),
                            _int_dtype(max(epochs * num_documents, int(lengths.max()))))
    per_chunk = max(1, _CHUNK // num_documents)  # whole epochs, several at once when the split is small
    for e0 in range(0, epochs, per_chunk):
        e1 = min(epochs, e0 + per_chunk)
        lo, hi = _epoch_sample_range(e0, e1, tokens_per_epoch, seq_len, count + 1)
        if lo >= hi:
            continue
        chunk_lengths = lengths[document_index[e0 * num_documents:e1 * num_documents] - first_document]
        ends = np.cumsum(chunk_lengths, dtype=np.int64)
        within = np.arange(lo, hi, dtype=np.int64) * seq_len - e0 * tokens_per_epoch
        position = np.searchsorted(ends, within, side="right")  # skips empty documents
        sample_index[lo:hi, 0] = e0 * num_documents + position
        sample_index[lo:hi, 1] = within - (ends[position] - chunk_lengths[position])

    shuffle_index = allocate("shuffle_index", count, _int_dtype(count))
    rng = seeding.random_state(seeding.SAMPLE_SHUFFLE, *parts)
    # the first sample ending in each epoch: sample i ends at token (i + 1) * seq_len, in epoch e from
    # i = ceil(e * T / L) - 1 on; the last epoch's block ends at count, whether or not more epochs follow
    bounds = np.maximum(-(-np.arange(epochs + 1, dtype=np.int64) * tokens_per_epoch // seq_len) - 1, 0)
    assert bounds[-1] == count
    for epoch in range(epochs):
        lo, hi = int(bounds[epoch]), int(bounds[epoch + 1])
        block = shuffle_index[lo:hi]
        _fill_arange(block, lo)
        if hi - lo > 1:  # blocks of one sample stay in place, and draw nothing
            rng.shuffle(block.view(np.ndarray))
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def gpt_index_description(source: DocumentSource, documents: range, seq_len: int, num_samples: int,
                          seed: int) -> dict:
    """Everything the indices depend on (hashed into the cache name); never the data-parallel layout."""
    return {"version": INDEX_VERSION, "source": source.identity, "documents": [documents.start, documents.stop],
            "seq_len": seq_len, "seed": seed, "num_samples": num_samples}


class GPTDataset:
    """Samples of documents `documents` of `source`: `dataset[i]` is {"tokens": int64[seq_len + 1]}.

    len(dataset) >= num_samples (every sample the E epochs hold). Indices come from `cache`, built there once.
    """

    def __init__(self, source: DocumentSource, documents: range, seq_len: int, num_samples: int, seed: int,
                 cache: IndexCache, split: str = "train"):
        self.source, self.documents, self.seq_len, self.split = source, documents, seq_len, split
        if num_samples <= 0:
            raise DatasetError(f"{source.path} ({split}): asked for {num_samples} samples")
        if len(documents) == 0:
            raise DatasetError(
                f"{source.path} ({split}): the split gives this dataset no documents (it has "
                f"{source.num_documents}); change `split` or give the split more data")
        description = gpt_index_description(source, documents, seq_len, num_samples, seed)
        stream = int(source.identity[:15], 16)  # decorrelates datasets of equal size under one seed

        def build(allocate: Allocate) -> dict[str, np.ndarray]:
            # the documents' lengths only where the indices are built: a copy of 4 bytes a document, in every
            # process, for indices most processes load from the cache. The whole index is checked here too, so a
            # damaged one fails now, naming its file, not in a loader worker mid-training
            source.check_layout()
            lengths = source.document_lengths(documents.start, documents.stop, dtype=np.int32)
            if int(lengths.sum(dtype=np.int64)) == 0:
                raise DatasetError(
                    f"{source.path} ({split}): documents {documents.start}..{documents.stop - 1} are empty")
            return build_gpt_indices(lengths, documents.start, seq_len, num_samples, seed, stream, allocate)

        self.indices = cache.load_or_build("gpt", description, build)
        self._bind()

    def _bind(self) -> None:
        self.document_index = self.indices.arrays["document_index"]
        self.sample_index = self.indices.arrays["sample_index"]
        self.shuffle_index = self.indices.arrays["shuffle_index"]

    @property
    def num_epochs(self) -> int:
        return len(self.document_index) // len(self.documents)

    @property
    def built(self) -> bool:
        """Whether this process built the indices (False: loaded them from the cache)."""
        return self.indices.built

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def stream_sample(self, position: int) -> np.ndarray:
        """Sample `position` of the unshuffled stream: its tokens [position*seq_len, (position+1)*seq_len]."""
        (d0, o0), (d1, o1) = self.sample_index[position], self.sample_index[position + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        get, doc = self.source.get, self.document_index
        if d0 == d1:
            pieces = [get(int(doc[d0]), o0, o1 - o0 + 1)]
        else:
            pieces = [get(int(doc[d0]), o0)] + [get(int(doc[d])) for d in range(d0 + 1, d1)] \
                + [get(int(doc[d1]), 0, o1 + 1)]
        tokens = np.concatenate(pieces).astype(np.int64)
        assert len(tokens) == self.seq_len + 1, (position, len(tokens))
        return tokens

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} outside [0, {len(self)})")
        return {"tokens": self.stream_sample(int(self.shuffle_index[index]))}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("document_index", "sample_index", "shuffle_index"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind()

