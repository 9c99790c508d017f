"""Shared fixtures: a real corpus shipped with Python (pydoc's topic help texts), a tokenizer trained on it once per
session, and helpers to write corpora and read prepared datasets back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep.tokenize import TokenizeOptions, tokenize_corpus
from data_prep.train_tokenizer import TrainSettings, train
from megatron_mega.data import indexed_dataset
from megatron_mega.data.manifest import Manifest


def topics() -> list[str]:
    from pydoc_data.topics import topics as table

    return [table[key] for key in sorted(table)]


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return topics()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_docs) -> str:
    folder = tmp_path_factory.mktemp("tokenizer")
    train(corpus_docs, TrainSettings(vocab_size=2000, threads=2)).save(folder)
    return str(folder)


def write_jsonl(path: Path, docs, key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({key: doc}) + "\n")
    return path


def tokenize(output, tokenizer_dir, inputs=(), **options):
    options.setdefault("progress", False)
    return tokenize_corpus(TokenizeOptions(output=str(output), tokenizer=tokenizer_dir,
                                           inputs=[str(i) for i in inputs], **options))


def documents(folder) -> list[np.ndarray]:
    """Every document of a prepared dataset, in manifest order (EOD included)."""
    manifest = Manifest.load(str(folder))
    out = []
    for shard in manifest.shards:
        dataset = indexed_dataset.IndexedDataset(manifest.shard_prefix(shard))
        for d in range(dataset.num_documents):
            out.append(np.concatenate([np.asarray(dataset[i]) for i in dataset.document_sequences(d)]))
    return out


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), the lock file left out."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != os.path.join(".prepare", "lock"):
                files[rel] = Path(path).read_bytes()
    return files
