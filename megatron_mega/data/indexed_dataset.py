"""Megatron's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`), read and written byte for byte.

Layout of `.idx` (little-endian), as Megatron-LM's `megatron/core/datasets/indexed_dataset.py` writes it:

    magic b"MMIDIDX\\x00\\x00" | version uint64 = 1 | dtype code uint8 | sequence count S uint64 |
    document-index length D uint64 | sequence lengths int32[S] | sequence pointers int64[S] |
    document indices int64[D]

`.bin` holds the token ids of all sequences back to back. One document is one sequence here (EOD appended by the
tokenizer), but readers accept Megatron files with several sequences per document. Codes follow Megatron: there is no
uint32 code, so vocabularies of 65500 and more are stored as int32 (code 4), as Megatron does.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Optional, Sequence

import numpy as np

from megatron_mega.data.open_files import make_room

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index length


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that is missing, truncated or not in Megatron's layout."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 below 65500 ids, else int32 (never a uint32, which has no code)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_path(prefix: str) -> str:
    return f"{prefix}.bin"


def index_path(prefix: str) -> str:
    return f"{prefix}.idx"


def exists(prefix: str) -> bool:
    return os.path.exists(data_path(prefix)) and os.path.exists(index_path(prefix))


def write_index(path: str, dtype: np.dtype, lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write a `.idx` file for sequences of `lengths` tokens of `dtype` (pointers derived)."""
    dtype = np.dtype(dtype)
    if dtype not in CODES:
        raise IndexedDatasetError(f"{path}: dtype {dtype} has no Megatron code (use one of {sorted(map(str, CODES))})")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
        raise IndexedDatasetError(f"{path}: a sequence longer than 2^31-1 tokens cannot be indexed")
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    document_indices = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as fh:
        fh.write(_HEADER.pack(MAGIC, VERSION, CODES[dtype], len(lengths), len(document_indices)))
        fh.write(lengths.astype(np.int32).tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(document_indices.tobytes(order="C"))


class IndexedDatasetWriter:
    """Append documents, then `finalize()`. Writes go to temporary names; the pair appears only when complete
    (`.bin` is renamed first, `.idx` last, so an `.idx` always has its full `.bin`)."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise IndexedDatasetError(f"{prefix}: dtype {self.dtype} has no Megatron code")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp_bin = f"{data_path(prefix)}.tmp-{os.getpid()}"
        self._tmp_idx = f"{index_path(prefix)}.tmp-{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self.num_tokens = 0

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(len(array))
        self.num_tokens += len(array)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Several one-sequence documents at once: `tokens` back to back, `lengths` their token counts."""
        array = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(array):
            raise ValueError(f"{self.prefix}: lengths sum to {int(lengths.sum())}, {len(array)} tokens given")
        self._bin.write(memoryview(array).cast("B"))
        first = len(self._lengths)
        self._lengths.extend(lengths.tolist())
        self._document_indices.extend(range(first + 1, first + len(lengths) + 1))
        self.num_tokens += len(array)

    def end_document(self) -> None:
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        self.add_sequence(tokens)
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self._tmp_idx, self.dtype, np.asarray(self._lengths, dtype=np.int64),
                    np.asarray(self._document_indices, dtype=np.int64))
        os.replace(self._tmp_bin, data_path(self.prefix))
        os.replace(self._tmp_idx, index_path(self.prefix))

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view: O(1) access to any sequence without loading the file."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx, binary = index_path(prefix), data_path(prefix)
        for path in (idx, binary):
            if not os.path.exists(path):
                raise IndexedDatasetError(f"{path}: missing")
        size = os.path.getsize(idx)
        if size < _HEADER.size:
            raise IndexedDatasetError(f"{idx}: truncated ({size} bytes, the header alone is {_HEADER.size})")
        with open(idx, "rb") as fh:
            magic, version, code, count, doc_count = _HEADER.unpack(fh.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{idx}: not a Megatron indexed dataset (magic {magic!r})")
        if version != VERSION:
            raise IndexedDatasetError(f"{idx}: version {version} is not supported (only {VERSION})")
        if code not in DTYPES:
            raise IndexedDatasetError(f"{idx}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + count * 4 + count * 8 + doc_count * 8
        if size < expected:
            raise IndexedDatasetError(f"{idx}: truncated ({size} bytes, expected {expected})")
        self._index = np.memmap(idx, mode="r", dtype=np.uint8)
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._index, dtype=np.int32, count=count, offset=offset)
        offset += count * 4
        self.sequence_pointers = np.frombuffer(self._index, dtype=np.int64, count=count, offset=offset)
        offset += count * 8
        self.document_indices = np.frombuffer(self._index, dtype=np.int64, count=doc_count, offset=offset)
        # O(1) checks here (every process opens every shard); check_layout() reads the whole index
        if doc_count < 1 or int(self.document_indices[0]) != 0 or int(self.document_indices[-1]) != count:
            found = (f"{int(self.document_indices[0])}..{int(self.document_indices[-1])}" if doc_count else "none")
            raise IndexedDatasetError(f"{idx}: document indices must run from 0 to the sequence count {count} "
                                      f"(found {found} in {doc_count} entries); not Megatron's layout")
        bin_size = os.path.getsize(binary)
        needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if count else 0
        if bin_size < needed:
            raise IndexedDatasetError(f"{binary}: truncated ({bin_size} bytes, the index needs {needed})")
        self._data = np.memmap(binary, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, dtype=np.uint8)

    def check_layout(self, block: int = 1 << 22) -> None:
        """Raise IndexedDatasetError unless every sequence has a non-negative length and lies inside the .bin, and
        the document indices never decrease. Reads the whole index once, in blocks (20 bytes a sequence): for the
        one process that builds sample indices, `prepare inspect` and `merge`, not for every open."""
        idx, binary = index_path(self.prefix), data_path(self.prefix)
        bin_size = len(self._data)
        for lo in range(0, len(self), block):
            lengths = self.sequence_lengths[lo:lo + block].astype(np.int64)
            pointers = self.sequence_pointers[lo:lo + block]
            bad = np.flatnonzero((lengths < 0) | (pointers < 0) | (pointers + lengths * self.dtype.itemsize > bin_size))
            if bad.size:
                i = int(bad[0])
                raise IndexedDatasetError(f"{idx}: sequence {lo + i} (length {int(lengths[i])}, byte offset "
                                          f"{int(pointers[i])}) does not lie inside {binary} ({bin_size} bytes)")
        for lo in range(0, self.num_documents, block):
            part = self.document_indices[lo:lo + block + 1]
            bad = np.flatnonzero(np.diff(part) < 0)
            if bad.size:
                i = int(bad[0])
                raise IndexedDatasetError(f"{idx}: document indices decrease at document {lo + i} "
                                          f"({int(part[i])} then {int(part[i + 1])})")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def tokens_to_last_end(self) -> int:
        """Tokens up to where the last sequence ends, from the index's last entry (O(1)): the token count for the
        contiguous layout every writer here and Megatron's make; a .bin may go on past it."""
        if len(self) == 0:
            return 0
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        return end // self.dtype.itemsize

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `index` (a view into the memory map)."""
        size = int(self.sequence_lengths[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: tokens {offset}:{offset + length} outside sequence {index} of {size}")
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def tokens_between(self, first: int, stop: int) -> np.ndarray:
        """The tokens of sequences first..stop-1 in one view, for a file whose sequences lie back to back in
        order (`is_contiguous`)."""
        if first >= stop:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first])
        count = int(self.sequence_pointers[stop - 1]) // self.dtype.itemsize + int(self.sequence_lengths[stop - 1]) \
            - start // self.dtype.itemsize
        return np.frombuffer(self._data, dtype=self.dtype, count=count, offset=start)

    def is_contiguous(self, block: int = 1 << 22) -> bool:
        """Whether every sequence starts where the one before it ends (as every writer here lays them out)."""
        size = self.dtype.itemsize
        for lo in range(0, len(self) - 1, block):
            pointers = self.sequence_pointers[lo:lo + block + 1]
            lengths = self.sequence_lengths[lo:lo + block].astype(np.int64)
            if not np.array_equal(pointers[1:], pointers[:-1] + lengths[:len(pointers) - 1] * size):
                return False
        return len(self) == 0 or int(self.sequence_pointers[0]) == 0

    def one_sequence_documents(self, block: int = 1 << 22) -> bool:
        """Whether every document is one sequence (data_prep's layout), read a block at a time: a whole-array diff
        is a 9-byte-a-document temporary, 5 GB in every process for a 600M-document Megatron file."""
        if self.num_documents != len(self):
            return False
        for lo in range(0, self.num_documents, block):
            if not np.all(np.diff(self.document_indices[lo:lo + block + 1]) == 1):
                return False
        return True

    def document_sequences(self, document: int) -> range:
        return range(int(self.document_indices[document]), int(self.document_indices[document + 1]))


def merge(prefixes: Iterable[str], out_prefix: str) -> None:
    """Concatenate datasets of one dtype into `out_prefix` (Megatron's merge rule), atomically."""
    prefixes = list(prefixes)
    if not prefixes:
        raise IndexedDatasetError(f"{out_prefix}: nothing to merge")
    make_room(len(prefixes), out_prefix)
    parts = [IndexedDataset(p) for p in prefixes]
    for part in parts:
        part.check_layout()  # a damaged part would be copied into the merged files
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise IndexedDatasetError(f"{out_prefix}: cannot merge datasets of dtypes {sorted(map(str, dtypes))}")
    dtype = parts[0].dtype
    tmp_bin = f"{data_path(out_prefix)}.tmp-{os.getpid()}"
    tmp_idx = f"{index_path(out_prefix)}.tmp-{os.getpid()}"
    try:
        lengths, documents, sequences = [], [np.zeros(1, dtype=np.int64)], 0
        with open(tmp_bin, "wb") as out:
            for part in parts:
                # the merged index's pointers follow from the lengths (Megatron's rule), so exactly the sequences'
                # bytes are copied: all of them up to the last one's end when they lie back to back, else one by
                # one (a .bin with bytes past its last sequence, or between two, would shift every later pointer)
                if part.is_contiguous():
                    remaining = part.tokens_to_last_end * dtype.itemsize
                    with open(data_path(part.prefix), "rb") as src:
                        while remaining and (chunk := src.read(min(1 << 24, remaining))):
                            out.write(chunk)
                            remaining -= len(chunk)
                else:
                    for i in range(len(part)):
                        out.write(part.get(i).tobytes())
                lengths.append(np.asarray(part.sequence_lengths, dtype=np.int64))
                documents.append(np.asarray(part.document_indices[1:], dtype=np.int64) + sequences)
                sequences += len(part)
        write_index(tmp_idx, dtype, np.concatenate(lengths), np.concatenate(documents))
        os.replace(tmp_bin, data_path(out_prefix))
        os.replace(tmp_idx, index_path(out_prefix))
    finally:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
