"""Labelled examples for fine-tuning: read through `datasets` (a local file, a saved dataset or a hub name) and
encoded into padded batches for the head of the task.

Tasks and the columns they read:
- sequence-classification: `--text-key` (and optionally `--text-pair-key`), `--label-key` (int class, or float
  for regression with num_labels=1)
- token-classification: `--text-key` holding a list of words, `--label-key` a list of int tags (one per word;
  sub-word pieces after the first get -100, as transformers' token-classification examples do)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from megatron_mega.model.heads import IGNORE_INDEX

TASKS = ("sequence-classification", "token-classification")


class ExamplesError(ValueError):
    """A dataset that cannot be read or lacks the columns the task needs."""


def load_examples(source: str, split: Optional[str] = None):
    """A `datasets.Dataset` from a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, or a hub name."""
    import datasets

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        suffix = source.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ExamplesError(f"{source}: unsupported file type .{suffix} (use jsonl, json, csv or parquet)")
        dataset = datasets.load_dataset(builder, data_files=source, split="train")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split or "train")
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; the user needs the message
            raise ExamplesError(
                f"{source}: cannot load it as a file, a saved dataset or a hub dataset ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split is None or split not in dataset:
            raise ExamplesError(f"{source}: choose a split with --split (available: {sorted(dataset)})")
        dataset = dataset[split]
    return dataset


@dataclass
class Encoder:
    task: str
    tokenizer: Any
    text_key: str
    label_key: str
    max_length: int
    text_pair_key: Optional[str] = None

    def check_columns(self, dataset, where: str) -> None:
        needed = [self.text_key, self.label_key] + ([self.text_pair_key] if self.text_pair_key else [])
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ExamplesError(f"{where}: no column(s) {missing} (columns: {dataset.column_names})")

    def encode(self, example: dict) -> tuple[list[int], Any]:
        if self.task == "sequence-classification":
            ids = self.tokenizer.encode(str(example[self.text_key]))
            if self.text_pair_key:
                ids = ids + [self.tokenizer.eos_id] + self.tokenizer.encode(str(example[self.text_pair_key]))
            return ids[:self.max_length], example[self.label_key]
        words, tags = example[self.text_key], example[self.label_key]
        if len(words) != len(tags):
            raise ExamplesError(f"token-classification: {len(words)} words but {len(tags)} tags in an example")
        ids, labels = [], []
        for word, tag in zip(words, tags):
            pieces = self.tokenizer.encode(str(word)) or [self.tokenizer.unk_id]
            ids += pieces
            labels += [int(tag)] + [IGNORE_INDEX] * (len(pieces) - 1)
        return ids[:self.max_length], labels[:self.max_length]

    def batches(self, dataset, batch_size: int, shuffle_seed: Optional[int] = None) -> Iterator[dict]:
        order = list(range(len(dataset)))
        if shuffle_seed is not None:
            generator = torch.Generator().manual_seed(shuffle_seed)
            order = torch.randperm(len(order), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            rows = [self.encode(dataset[i]) for i in order[start:start + batch_size]]
            yield self.collate(rows)

    def collate(self, rows: list[tuple[list[int], Any]]) -> dict[str, torch.Tensor]:
        """Right-padded ids with an attention mask (the classification heads read the first token)."""
        length = max(1, max(len(ids) for ids, _ in rows))
        pad = self.tokenizer.pad_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.task == "sequence-classification":
            labels = [label for _, label in rows]
            dtype = torch.float32 if any(isinstance(x, float) for x in labels) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        else:
            labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
            for i, (_, tags) in enumerate(rows):
                labels[i, :len(tags)] = torch.tensor(tags, dtype=torch.long)
            batch["labels"] = labels
        return batch
