"""Shared fixtures: a real corpus shipped with Python (pydoc's topic help texts), a tokenizer trained on it once per
session, and a helper to write corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.train_tokenizer import TrainSettings, train


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
