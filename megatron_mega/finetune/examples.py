"""Labelled examples for fine-tuning: read through `datasets` (a local file, a saved dataset or a hub name) and
encoded into padded batches for the head of the task.

Tasks and the columns they read:
- sequence-classification: `--text-key` (and optionally `--text-pair-key`), `--label-key`: a class (int, string
  or `datasets.ClassLabel`), or a float column for regression (num_labels=1), as transformers' run_glue decides
- token-classification: `--text-key` holding a list of words, `--label-key` a list of tags (int, string or
  ClassLabel; one per word; sub-word pieces after the first get -100, as transformers' token-classification
  examples do)

Labels become head ids as transformers' examples map them: ClassLabel and int labels are their own ids, string
labels are numbered in sorted order (or by the model directory's label2id when it already names them all), and
every label of both splits is checked against num_labels before anything trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Optional

import torch

from megatron_mega.model.heads import IGNORE_INDEX

TASKS = ("sequence-classification", "token-classification")


class ExamplesError(ValueError):
    """A dataset that cannot be read or lacks the columns the task needs."""


def load_examples(source: str, split: Optional[str] = None):
    """A `datasets.Dataset` from a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, or a hub name."""
    import datasets

    builders = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
    suffix = source.rsplit(".", 1)[-1].lower() if "." in os.path.basename(source) else ""
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        builder = builders.get(suffix)
        if builder is None:
            raise ExamplesError(f"{source}: unsupported file type .{suffix} (use jsonl, json, csv or parquet)")
        try:
            dataset = datasets.load_dataset(builder, data_files=source, split="train")
        except Exception as err:  # noqa: BLE001 - datasets wraps the parser's error in its own kinds
            cause = err.__cause__ or err.__context__ or err
            raise ExamplesError(f"{source}: not readable as {suffix} ({type(cause).__name__}: "
                                f"{' '.join(str(cause).split())[:300]})") from None
    elif suffix in builders or source.startswith((os.sep, ".", "~")) or os.path.isdir(source):
        # a path, not a hub name: say so at once (the hub lookup retries for half a minute offline)
        raise ExamplesError(f"{source}: no such file" + (" (a folder without dataset_info.json: not a saved "
                                                          "dataset)" if os.path.isdir(source) else ""))
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


@dataclass(frozen=True)
class Labels:
    """How the label column's values become the head's label ids."""

    num_labels: int
    names: Optional[tuple] = None  # the label value of each id (strings / ClassLabel names); None: ints are ids
    regression: bool = False
    by_value: bool = False  # values are looked up in `names` (strings), not used as ids (ints, ClassLabel)

    def id_of(self, value: Any) -> Any:
        if self.regression:
            return float(value)
        if self.by_value:
            return self._ids[value] if value != IGNORE_INDEX else IGNORE_INDEX
        return int(value)

    @cached_property
    def _ids(self) -> dict:
        # a token-classification set looks a tag up per word: a dict, not names.index
        return {name: i for i, name in enumerate(self.names or ())}

    def config_overrides(self) -> dict[str, Any]:
        """num_labels, id2label, label2id (and the regression problem type) for the model's config."""
        names = self.names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        id2label = {i: str(name) for i, name in enumerate(names)}
        # problem_type is set either way: a directory fine-tuned for regression before must not keep it
        return {"num_labels": self.num_labels, "id2label": id2label,
                "label2id": {name: i for i, name in id2label.items()},
                "problem_type": "regression" if self.regression else None}


def _label_feature(dataset, label_key: str, task: str):
    feature = dataset.features.get(label_key)
    if task == "token-classification":
        feature = getattr(feature, "feature", None) if not isinstance(feature, list) else feature[0]
    return feature


def infer_labels(splits: list[tuple[str, Any]], task: str, label_key: str, num_labels: Optional[int] = None,
                 known_label2id: Optional[dict] = None) -> Labels:
    """The label ids of `splits` ([(name, dataset)], train first), checked: every value must map into
    [0, num_labels). `num_labels` None: from the data (ClassLabel names, distinct strings, or the largest int + 1,
    at least the known classes' count). `known_label2id`: the label2id of a model directory already fine-tuned for
    this task: string labels it names all of keep its order, and int labels its number of classes, so its
    classifier is kept."""
    import datasets

    values: list[tuple[str, Any]] = []
    for where, dataset in splits:
        column = dataset[label_key]
        if task == "token-classification":
            for row in column:
                if not isinstance(row, (list, tuple)):
                    raise ExamplesError(f"{where}: column {label_key!r} must hold a list of tags per example "
                                        f"(token-classification), found {row!r}")
                values += [(where, v) for v in row]
        else:
            values += [(where, v) for v in column]
    feature = _label_feature(splits[0][1], label_key, task)
    if isinstance(feature, datasets.ClassLabel):
        labels = Labels(len(feature.names), tuple(feature.names))
    else:
        kinds = {type(v) for _, v in values if v is not None}
        if not values or None in {v for _, v in values}:
            where = next((w for w, v in values if v is None), splits[0][0])
            raise ExamplesError(f"{where}: column {label_key!r} has examples without a label")
        floats = kinds <= {float, int} and float in kinds or getattr(feature, "dtype", "").startswith("float")
        # num_labels 1 is regression whatever the column's type (transformers' heads decide so): 1..5 ratings
        if floats or (num_labels == 1 and kinds <= {int} and task == "sequence-classification"):
            if task != "sequence-classification":
                raise ExamplesError(f"{splits[0][0]}: float labels in {label_key!r}; token-classification needs "
                                    f"class tags")
            if num_labels not in (None, 1):
                raise ExamplesError(f"--num-labels {num_labels}: the labels in {label_key!r} are floats, which is "
                                    f"regression (num_labels 1); give int or string classes for classification")
            return Labels(1, regression=True)
        if kinds <= {int, bool}:
            tags = [v for _, v in values if not (task == "token-classification" and v == IGNORE_INDEX)]
            labels = Labels(num_labels or max(int(max(tags, default=0)) + 1, len(known_label2id or {})))
        elif kinds <= {str}:
            distinct = sorted({v for _, v in values})
            known = {k: int(i) for k, i in (known_label2id or {}).items()}
            if known and set(distinct) <= set(known) and sorted(known.values()) == list(range(len(known))):
                names = tuple(sorted(known, key=known.get))
            else:
                names = tuple(distinct)
            labels = Labels(len(names), names, by_value=True)
        else:
            raise ExamplesError(f"{splits[0][0]}: column {label_key!r} mixes label types "
                                f"({', '.join(sorted(k.__name__ for k in kinds))}); use ints or strings")
    if num_labels is not None and num_labels != labels.num_labels and labels.names is not None:
        shown = ", ".join(map(str, labels.names[:10])) + ("…" if labels.num_labels > 10 else "")
        raise ExamplesError(f"--num-labels {num_labels}: the labels in {label_key!r} name {labels.num_labels} "
                            f"classes ({shown})")
    if not labels.by_value:
        for where, value in values:
            if not (0 <= int(value) < labels.num_labels
                    or (task == "token-classification" and value == IGNORE_INDEX)):
                raise ExamplesError(f"{where}: label {value!r} in {label_key!r} is outside [0, {labels.num_labels})"
                                    f"{f' (--num-labels {num_labels})' if num_labels is not None else ''}")
    return labels


@dataclass
class Encoder:
    task: str
    tokenizer: Any
    text_key: str
    label_key: str
    max_length: int
    text_pair_key: Optional[str] = None
    labels: Labels = Labels(2)

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
            return ids[:self.max_length], self.labels.id_of(example[self.label_key])
        words, tags = example[self.text_key], example[self.label_key]
        if len(words) != len(tags):
            raise ExamplesError(f"token-classification: {len(words)} words but {len(tags)} tags in an example")
        ids, labels = [], []
        for word, tag in zip(words, tags):
            pieces = self.tokenizer.encode(str(word)) or [self.tokenizer.unk_id]
            ids += pieces
            labels += [self.labels.id_of(tag)] + [IGNORE_INDEX] * (len(pieces) - 1)
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
        # a tokenizer without a pad piece (SentencePiece's default) has pad id -1: any id works under the mask
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.task == "sequence-classification":
            labels = [label for _, label in rows]
            batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.labels.regression else torch.long)
        else:
            labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
            for i, (_, tags) in enumerate(rows):
                labels[i, :len(tags)] = torch.tensor(tags, dtype=torch.long)
            batch["labels"] = labels
        return batch
