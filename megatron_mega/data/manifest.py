"""`manifest.json`: what a prepared dataset directory holds, so training can trust (and verify) it.

    {
      "format": "megatron_mega.dataset", "version": 1,
      "tokenizer": {"sha256": ..., "vocab_size": ..., "bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3,
                    "mask_id": 4, "model_file": "tokenizer.model"},
      "dtype": "uint16",                      # numpy name; the .idx files carry Megatron's code for it
      "shards": [{"prefix": "shard-00000", "documents": 812, "tokens": 1048576,
                  "bin_sha256": ..., "idx_sha256": ...}, ...],   # prefixes relative to the manifest's folder
      "documents": ..., "tokens": ...,        # totals over the shards
      "skipped": {"empty": 3, "invalid_json": 1, ...},
      "sources": ["corpus/*.jsonl", ...]
    }

The EOD token appended to every document is the tokenizer's eos_id.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from megatron_mega.atomic_io import atomic_write_text
from megatron_mega.data import indexed_dataset
from megatron_mega.json_file import load_json_object

FORMAT = "megatron_mega.dataset"
VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, malformed, inconsistent with its shards, or for another tokenizer."""


def sha256_file(path: str, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TokenizerInfo:
    sha256: str
    vocab_size: int
    bos_id: int
    pad_id: int
    eos_id: int
    unk_id: int
    mask_id: Optional[int] = None
    model_file: Optional[str] = None


@dataclass
class ShardEntry:
    prefix: str
    documents: int
    tokens: int
    bin_sha256: str
    idx_sha256: str


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    dtype: str
    shards: list[ShardEntry] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    # the folder holding manifest.json; shard prefixes are relative to it (not serialised)
    root: str = field(default=".", repr=False, compare=False)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard_prefix(self, shard: ShardEntry) -> str:
        return os.path.join(self.root, shard.prefix)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "tokenizer": asdict(self.tokenizer), "dtype": self.dtype,
                "shards": [asdict(s) for s in self.shards], "documents": self.documents, "tokens": self.tokens,
                "skipped": dict(sorted(self.skipped.items())), "sources": list(self.sources)}

    def save(self, directory: Optional[str] = None) -> str:
        directory = directory or self.root
        path = os.path.join(directory, MANIFEST_NAME)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """Load `path` (a manifest.json or the folder holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        if not os.path.exists(path):
            raise ManifestError(f"{path}: no manifest (prepare the dataset first)")
        data = load_json_object(path, ManifestError, "a megatron_mega dataset manifest")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path}: not a megatron_mega dataset manifest (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise ManifestError(f"{path}: manifest version {data.get('version')} is not supported (only {VERSION})")
        try:
            manifest = cls(tokenizer=TokenizerInfo(**data["tokenizer"]), dtype=data["dtype"],
                           shards=[ShardEntry(**s) for s in data["shards"]], skipped=dict(data.get("skipped", {})),
                           sources=list(data.get("sources", [])), root=os.path.dirname(os.path.abspath(path)))
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{path}: malformed manifest ({err})") from None
        try:
            known = np.dtype(manifest.dtype) in indexed_dataset.CODES
        except TypeError:
            known = False
        if not known:
            raise ManifestError(f"{path}: dtype {manifest.dtype!r} has no Megatron code")
        return manifest

    def verify(self, checksums: bool = True) -> None:
        """Raise ManifestError unless every shard exists, matches its counts (its index's lengths summed) and
        (optionally) its sha256."""
        for shard in self.shards:
            self.check_token_sum(shard, self._checked_shard(shard, checksums))

    @staticmethod
    def check_token_sum(shard: ShardEntry, dataset: indexed_dataset.IndexedDataset) -> None:
        """The shard's index lengths, summed (4 bytes a document read), against the manifest's token count."""
        if dataset.num_tokens != shard.tokens:
            raise ManifestError(f"shard {shard.prefix}: its index's lengths add up to {dataset.num_tokens} "
                                f"tokens, the manifest says {shard.tokens}")

    def open_shards(self, checksums: bool = False) -> list[indexed_dataset.IndexedDataset]:
        """Every shard, opened and checked in O(1) a shard: documents, tokens (to the last sequence's end), dtype, and
        with `checksums` its sha256. Every process of a job opens the data: summing the lengths would read 4 bytes
        a document of index in each (`verify` does, and so does the process that builds the sample indices)."""
        return [self._checked_shard(shard, checksums) for shard in self.shards]

    def _checked_shard(self, shard: ShardEntry, checksums: bool) -> indexed_dataset.IndexedDataset:
        try:
            dataset = indexed_dataset.IndexedDataset(self.shard_prefix(shard))
        except indexed_dataset.IndexedDatasetError as err:
            raise ManifestError(f"shard {shard.prefix}: {err}") from None
        if str(dataset.dtype) != self.dtype:
            raise ManifestError(f"shard {shard.prefix}: dtype {dataset.dtype}, the manifest says {self.dtype}")
        tokens = dataset.tokens_to_last_end
        if dataset.num_documents != shard.documents or tokens != shard.tokens:
            raise ManifestError(
                f"shard {shard.prefix}: holds {dataset.num_documents} documents / {tokens} tokens, the manifest "
                f"says {shard.documents} / {shard.tokens}")
        if checksums:
            problem = self.checksum_problem(shard)
            if problem is not None:
                raise ManifestError(problem)
        return dataset

    def checksum_problem(self, shard: ShardEntry) -> Optional[str]:
        """Why `shard`'s files do not hash to what the manifest records, or None when they do."""
        prefix = self.shard_prefix(shard)
        for kind, expected in (("bin", shard.bin_sha256), ("idx", shard.idx_sha256)):
            try:
                actual = sha256_file(f"{prefix}.{kind}")
            except OSError as err:
                return f"{prefix}.{kind}: cannot be read ({err.strerror or err})"
            if actual != expected:
                return f"{prefix}.{kind}: sha256 {actual} != manifest {expected}"
        return None

    def check_tokenizer(self, sha256: str, what: str = "the tokenizer given") -> None:
        if sha256 != self.tokenizer.sha256:
            raise ManifestError(
                f"{os.path.join(self.root, MANIFEST_NAME)}: "
                f"prepared with tokenizer sha256 {self.tokenizer.sha256[:12]}…, "
                f"but {what} has sha256 {sha256[:12]}…; re-tokenize or use the matching tokenizer")
