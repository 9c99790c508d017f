"""Shared fixtures: a real text corpus (pydoc's topic help, shipped with Python) tokenized by data_prep, and the
tiny training config pointed at it."""

from __future__ import annotations

import json
import os

import pytest

from megatron_mega.yaml_config import load_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "train", "tiny.yaml")


@pytest.fixture(scope="session")
def pydoc_dataset(tmp_path_factory) -> dict[str, str]:
    from pydoc_data.topics import topics as table

    from data_prep.tokenize import TokenizeOptions, tokenize_corpus
    from data_prep.train_tokenizer import TrainSettings, train

    root = tmp_path_factory.mktemp("pydoc")
    docs = [table[key] for key in sorted(table)]
    tokenizer_dir = str(root / "tokenizer")
    train(docs, TrainSettings(vocab_size=2000, threads=2)).save(tokenizer_dir)
    with open(root / "docs.jsonl", "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
    dataset = str(root / "dataset")
    tokenize_corpus(TokenizeOptions(output=dataset, tokenizer=tokenizer_dir, inputs=[str(root / "docs.jsonl")],
                                    progress=False))
    return {"tokenizer": tokenizer_dir, "dataset": dataset, "root": str(root)}


@pytest.fixture(scope="session")
def tiny_dict(pydoc_dataset) -> dict:
    """configs/train/tiny.yaml as a dict, reading the pydoc dataset."""
    data = load_yaml(TINY)
    data["data"]["paths"] = [pydoc_dataset["dataset"]]
    data["tokenizer"] = pydoc_dataset["tokenizer"]
    return data
