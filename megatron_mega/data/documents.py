"""The documents of one prepared dataset, memory-mapped: a manifest's shards back to back, or one bare Megatron prefix.

Documents are numbered 0..N-1 across the shards in manifest order. `get(doc, offset, length)` is a view into the
memory map (no copy) when the document is one sequence, which is how data_prep writes them (EOD included); Megatron
files with several sequences per document are read too (their sequences are concatenated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator, Optional

import numpy as np

from megatron_mega.data import indexed_dataset, open_files
from megatron_mega.data.index_cache import IndexCache
from megatron_mega.data.manifest import MANIFEST_NAME, Manifest, ManifestError, sha256_file

logger = logging.getLogger(__name__)


def is_manifest_path(path: str) -> bool:
    return path.endswith((".json", "/", os.sep)) or os.path.isdir(path)


class DocumentSource:
    """Documents of `path`: a manifest.json, a folder holding one, or a bare Megatron prefix (`PREFIX.bin/.idx`)."""

    def __init__(self, path: str, verify_checksums: bool = False, identity: Optional[str] = None):
        self.path = path
        self.verify_checksums = verify_checksums
        self.manifest: Optional[Manifest] = None
        if is_manifest_path(path):
            self.manifest = Manifest.load(path)
            if not self.manifest.shards:
                raise ManifestError(f"{os.path.join(self.manifest.root, MANIFEST_NAME)}: lists no shards")
            open_files.make_room(len(self.manifest.shards), path)
            # counts and dtype always; sha256 when asked
            self.shards = self.manifest.open_shards(checksums=verify_checksums)
        else:
            if not indexed_dataset.exists(path):
                raise indexed_dataset.IndexedDatasetError(
                    f"{path}: neither a manifest (a .json file or a folder holding {MANIFEST_NAME}) nor a Megatron "
                    f"prefix ({path}.bin and {path}.idx)")
            open_files.make_room(1, path)
            self.shards = [indexed_dataset.IndexedDataset(path)]
        # one sequence per document (data_prep's layout): index the memory-mapped arrays directly, no copies
        self._single = [s.one_sequence_documents() for s in self.shards]
        self._lengths = [s.sequence_lengths if single else _document_lengths(s)
                         for s, single in zip(self.shards, self._single)]
        self._starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([s.num_documents for s in self.shards], out=self._starts[1:])
        self._identity = identity

    # ------------------------------------------------------------------ identity (keys the index cache)
    def identity_from(self, cache: IndexCache) -> None:
        """Take a bare prefix's identity from `cache`, where one process records it for all (prefix_identity)."""
        if self._identity is None and self.manifest is None:
            self._identity = prefix_identity(self.path, cache)

    @property
    def identity(self) -> str:
        """A digest of the content, not the location: moving the data keeps its caches valid. Computed when first
        asked (a dry run never asks): a bare prefix's means hashing its whole .idx."""
        if self._identity is None:
            if self.manifest is not None:
                content = {"dtype": self.manifest.dtype,
                           "shards": [[s.bin_sha256, s.idx_sha256, s.documents, s.tokens]
                                      for s in self.manifest.shards]}
                self._identity = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            else:
                self._identity = prefix_content_identity(self.path)
        return self._identity

    # ------------------------------------------------------------------ access
    @property
    def num_documents(self) -> int:
        return int(self._starts[-1])

    def check_layout(self) -> None:
        """Every shard's index, read whole and checked (IndexedDataset.check_layout), and its lengths summed against
        the manifest's token count; once per instance."""
        if not getattr(self, "_layout_checked", False):
            for k, shard in enumerate(self.shards):
                shard.check_layout()
                if self.manifest is not None:
                    self.manifest.check_token_sum(self.manifest.shards[k], shard)
            self._layout_checked = True

    def document_lengths(self, start: int = 0, stop: Optional[int] = None, dtype=np.int64) -> np.ndarray:
        """Token counts of documents `start:stop`, a copy in `dtype`; int64 instead when a count does not fit
        (a document of several sequences: one sequence's count is an int32 in the index)."""
        stop = self.num_documents if stop is None else stop
        out = np.empty(max(stop - start, 0), dtype=dtype)
        for k, lo, hi in self._shard_ranges(start, stop):
            piece = self._lengths[k][lo - self._starts[k]:hi - self._starts[k]]
            if piece.dtype.itemsize > out.dtype.itemsize and int(piece.max()) > np.iinfo(out.dtype).max:
                return self.document_lengths(start, stop)
            out[lo - start:hi - start] = piece
        return out

    def token_count(self, start: int = 0, stop: Optional[int] = None) -> int:
        """Tokens in documents `start:stop`: a whole shard's from the manifest, the part of a shard from its
        memory-mapped index (the natural blend weights ask every process for this: summing every length would read
        4 bytes a document of index in each)."""
        stop = self.num_documents if stop is None else stop
        total = 0
        for k, lo, hi in self._shard_ranges(start, stop):
            if self.manifest is not None and (lo, hi) == (self._starts[k], self._starts[k + 1]):
                total += self.manifest.shards[k].tokens  # checked against the index on open
            else:
                total += int(self._lengths[k][lo - self._starts[k]:hi - self._starts[k]].sum(dtype=np.int64))
        return total

    def _shard_ranges(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, first, stop) of the documents `start:stop` each shard holds (global document numbers)."""
        for k in range(len(self.shards)):
            lo, hi = max(start, int(self._starts[k])), min(stop, int(self._starts[k + 1]))
            if lo < hi:
                yield k, lo, hi

    def get(self, document: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens `offset : offset + length` of `document` (to its end when `length` is None)."""
        if not 0 <= document < self.num_documents:
            raise IndexError(f"{self.path}: document {document} outside [0, {self.num_documents})")
        k = int(np.searchsorted(self._starts, document, side="right")) - 1  # shards are few: effectively O(1)
        local = document - int(self._starts[k])
        shard = self.shards[k]
        if self._single[k]:
            return shard.get(local, offset, length)
        size = int(self._lengths[k][local])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.path}: tokens {offset}:{offset + length} outside document {document} of {size}")
        pieces, position = [], 0
        for sequence in shard.document_sequences(local):
            n = int(shard.sequence_lengths[sequence])
            lo, hi = max(offset, position), min(offset + length, position + n)
            if lo < hi:
                pieces.append(shard.get(sequence, lo - position, hi - lo))
            position += n
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=shard.dtype)

    # ------------------------------------------------------------------ pickling (DataLoader workers under spawn)
    def __getstate__(self) -> dict:
        # memory maps pickle by value (the whole file); send the path and map it again instead
        return {"path": self.path, "identity": self.identity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], verify_checksums=False, identity=state["identity"])


def prefix_content_identity(path: str) -> str:
    """A bare prefix has no recorded checksums: its .idx is hashed, its .bin only sized."""
    content = {"idx_sha256": sha256_file(indexed_dataset.index_path(path)),
               "bin_bytes": os.path.getsize(indexed_dataset.data_path(path))}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def prefix_identity(path: str, cache: IndexCache) -> str:
    """prefix_content_identity, hashed by one process: kept in `cache` under the files' location, inode, size and
    change times, so that the other processes of a job and later runs read it instead of hashing the whole .idx
    again (12 bytes a document: 7 GB at 600M documents, read by every process of the job otherwise). The change
    time (ctime) is in the key because a rewrite can keep the size and the modification time (`cp -p`, `tar x`),
    and nothing can set the ctime back."""
    stats = {}
    for kind, file in (("idx", indexed_dataset.index_path(path)), ("bin", indexed_dataset.data_path(path))):
        status = os.stat(file)
        stats[kind] = [os.path.realpath(file), status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]
    try:
        entry = cache.load_or_build("prefix", {"version": 2, **stats}, lambda allocate: {
            "identity": np.frombuffer(bytes.fromhex(prefix_content_identity(path)), dtype=np.uint8)})
    except OSError as err:  # a read-only cache of indices built elsewhere: still readable, so hash here
        logger.info("%s: cannot record the identity of %s (%s); hashing it in this process", cache.directory, path, err)
        return prefix_content_identity(path)
    return bytes(entry.arrays["identity"]).hex()


def _document_lengths(shard: indexed_dataset.IndexedDataset) -> np.ndarray:
    """Per-document token counts of a file with several sequences per document."""
    seq_ends = np.zeros(len(shard) + 1, dtype=np.int64)
    np.cumsum(shard.sequence_lengths, out=seq_ends[1:])
    bounds = np.asarray(shard.document_indices, dtype=np.int64)
    return seq_ends[bounds[1:]] - seq_ends[bounds[:-1]]
