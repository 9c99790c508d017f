"""Tiny prepared datasets for the data tests: shards written with IndexedDatasetWriter, described by a Manifest."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron_mega.data.indexed_dataset import IndexedDatasetWriter
from megatron_mega.data.manifest import Manifest, ShardEntry, TokenizerInfo, sha256_file

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
TOKENIZER_SHA = "ab" * 32


def random_documents(count: int, seed: int = 0, vocab: int = 1000, min_len: int = 1, max_len: int = 40):
    """Documents of random text ids (>= 5, never special) each ending with EOS, as data_prep writes them."""
    rng = np.random.RandomState(seed)
    return [np.append(rng.randint(5, vocab, size=rng.randint(min_len, max_len + 1)), EOS) for _ in range(count)]


def labelled_documents(count: int, start: int = 0, seed: int = 0, max_len: int = 30):
    """Document d's text tokens all equal 100 + start + d, so any token tells which document it came from."""
    rng = np.random.RandomState(seed)
    return [np.append(np.full(rng.randint(1, max_len + 1), 100 + start + d), EOS) for d in range(count)]


def make_manifest(root, documents, shards: int = 1, vocab: int = 1000, tokenizer_sha: str = TOKENIZER_SHA,
                  mask_id=MASK) -> str:
    """Write `documents` into `shards` shards under `root` with a manifest; returns the folder."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    entries = []
    for k, part in enumerate(np.array_split(np.arange(len(documents)), shards)):
        prefix = f"shard-{k:05d}"
        with IndexedDatasetWriter(os.path.join(root, prefix), np.uint16) as writer:
            for d in part:
                writer.add_document(documents[d])
        path = os.path.join(root, prefix)
        entries.append(ShardEntry(prefix=prefix, documents=len(part), tokens=int(sum(len(documents[d]) for d in part)),
                                  bin_sha256=sha256_file(f"{path}.bin"), idx_sha256=sha256_file(f"{path}.idx")))
    tokenizer = TokenizerInfo(sha256=tokenizer_sha, vocab_size=vocab, bos_id=BOS, pad_id=PAD, eos_id=EOS,
                              unk_id=UNK, mask_id=mask_id, model_file="tokenizer.model")
    Manifest(tokenizer=tokenizer, dtype="uint16", shards=entries, root=root).save()
    return root


def index_digest(arrays: dict) -> str:
    """A digest of index arrays: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name} {array.dtype} {array.shape}".encode() + array.tobytes())
    return digest.hexdigest()[:16]
