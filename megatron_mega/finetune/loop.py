"""Fine-tuning a converted MEGA directory on a labelled task: one loop for every task head (`model(**batch).loss`).

A causal (decoder) checkpoint is fine-tuned with bidirectional attention (is_decoder=False): the classification
heads read the first token, which under causal attention would see nothing but itself. The EMA keeps its causal
weights; every position's attention then reads its whole chunk.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_mega.atomic_io import atomic_directory, is_within
from megatron_mega.finetune.examples import TASKS, Encoder, ExamplesError, infer_labels
from megatron_mega.model.config import MegaConfig
from megatron_mega.model.heads import IGNORE_INDEX, MEGA_HEADS
from megatron_mega.model.pretrained import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    task: str = "sequence-classification"
    num_labels: Optional[int] = None  # None: from the labels (see examples.infer_labels)
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_length: int = 256
    seed: int = 0
    text_key: str = "text"
    text_pair_key: Optional[str] = None
    label_key: str = "label"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ExamplesError(f"task: {self.task!r} is not one of {TASKS}")
        for name in ("num_labels", "epochs", "batch_size", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ExamplesError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class FinetuneResult:
    train_losses: list[float] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model, encoder: Encoder, dataset, batch_size: int) -> dict[str, float]:
    """Mean loss over the batches, and accuracy over labelled positions for classification (not regression)."""
    model.eval()
    total_loss, batches, correct, counted = 0.0, 0, 0, 0
    for batch in encoder.batches(dataset, batch_size):
        out = model(**batch)
        total_loss += float(out.loss)
        batches += 1
        labels = batch["labels"]
        if not encoder.labels.regression:
            predictions = out.logits.argmax(-1)
            keep = labels != IGNORE_INDEX
            correct += int((predictions[keep] == labels[keep]).sum())
            counted += int(keep.sum())
    result = {"loss": total_loss / max(batches, 1)}
    if counted:
        result["accuracy"] = correct / counted
    return result


def check_model_dir(model_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        hint = ("a training checkpoint folder: convert it with `megatron-mega convert` first"
                if os.path.exists(os.path.join(model_dir, "latest")) else
                "convert a training checkpoint with `megatron-mega convert` first")
        raise CheckpointError(f"{model_dir}: no config.json; not a Hugging Face model directory ({hint})")


def finetune(model_dir: str, train_set, eval_set, settings: FinetuneSettings, tokenizer,
             output_dir: Optional[str] = None, print_fn=print, force: bool = False) -> FinetuneResult:
    """Fine-tune `model_dir` and, with `output_dir`, save the result there atomically. An existing output is
    replaced only with `force`, and never when it is (or holds) the model directory being read."""
    cls = MEGA_HEADS[settings.task]
    if output_dir:  # refused before any training, not after it
        if is_within(model_dir, output_dir):
            raise CheckpointError(f"{output_dir}: holds the model being fine-tuned ({model_dir}); writing there "
                                  f"would replace it. Choose another output directory")
        if os.path.exists(output_dir) and not force:
            raise CheckpointError(f"{output_dir}: exists; pass --force to replace it")
    encoder = Encoder(settings.task, tokenizer, settings.text_key, settings.label_key, settings.max_length,
                      settings.text_pair_key)
    encoder.check_columns(train_set, "train")
    encoder.check_columns(eval_set, "eval")
    check_model_dir(model_dir)
    saved = MegaConfig.from_pretrained(model_dir)
    # a directory fine-tuned for this task before names its classes; a pretrained LM's default labels name none
    tuned_before = (saved.architectures or [None])[0] == cls.__name__
    encoder.labels = infer_labels([("train", train_set), ("eval", eval_set)], settings.task, settings.label_key,
                                  settings.num_labels, saved.label2id if tuned_before else None)
    torch.manual_seed(settings.seed)
    model, report = cls.from_pretrained(model_dir, ignore_mismatched_sizes=True, output_loading_info=True,
                                        is_decoder=False, **encoder.labels.config_overrides())
    print_fn(f"loaded {cls.__name__} from {model_dir}: {len(report.loaded_keys)} tensors; new: "
             f"{', '.join(report.missing_keys + [k for k, _, _ in report.mismatched_keys]) or 'none'}; "
             f"{encoder.labels.num_labels} label(s)"
             + ("" if encoder.labels.names is None else f": {', '.join(map(str, encoder.labels.names[:10]))}"))
    result = FinetuneResult()
    result.eval_before = evaluate(model, encoder, eval_set, settings.batch_size)
    print_fn(f"before: eval {_fmt(result.eval_before)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    started = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        losses = []
        for batch in encoder.batches(train_set, settings.batch_size, shuffle_seed=settings.seed + epoch):
            loss = model(**batch).loss
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"epoch {epoch + 1}: non-finite loss {value}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(value)
        result.train_losses.append(sum(losses) / max(len(losses), 1))
        metrics = evaluate(model, encoder, eval_set, settings.batch_size)
        print_fn(f"epoch {epoch + 1}/{settings.epochs}: train loss {result.train_losses[-1]:.4f}, eval {_fmt(metrics)}")
    result.eval_after = metrics
    result.seconds = time.perf_counter() - started
    if output_dir:
        with atomic_directory(output_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save(tmp)
        print_fn(f"saved the fine-tuned {cls.__name__} to {os.path.abspath(output_dir)}")
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
