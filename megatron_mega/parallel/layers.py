"""Pipeline layers: the model's own layer classes with DeepSpeed's one-argument forward.

Between stages one fixed structure travels: `hidden` (B, L, D) alone, or `(hidden, attention_mask)` when the first
stage received `(input_ids, attention_mask)`; the mask is the user's (B, L) 1/0 integer tensor, passed unchanged
(DeepSpeed sends integer tensors between stages without gradients; bool tensors need an engine flag).
The subclasses add no parameters, so their state dicts have the names of MegaEmbeddings / MegaBlock.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from megatron_mega.model.block import MegaBlock
from megatron_mega.model.embeddings import MegaEmbeddings
from megatron_mega.model.lm_loss import LMHeadTransform, lm_head_loss
from megatron_mega.model.mega_model import padding_mask_from

IGNORE_INDEX = -100
Activations = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def split_activations(inputs: Activations) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if torch.is_tensor(inputs):
        return inputs, None
    if len(inputs) == 1:
        return inputs[0], None
    hidden, mask = inputs
    return hidden, mask


def join_activations(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> Activations:
    return hidden if mask is None else (hidden, mask)


class EmbeddingPipe(MegaEmbeddings):
    """(input_ids,) or (input_ids, attention_mask) -> hidden or (hidden, attention_mask)."""

    def forward(self, inputs) -> Activations:  # type: ignore[override]
        input_ids, mask = split_activations(inputs)
        return join_activations(super().forward(input_ids=input_ids), mask)


class MegaBlockPipe(MegaBlock):
    """One MEGA block; the unit of partitioning and of activation checkpointing."""

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        hidden, mask = split_activations(inputs)
        padding = padding_mask_from(mask, hidden.shape[1], 0)
        hidden = super().forward(hidden, padding)[0]
        return join_activations(hidden, mask)


class LMHeadPipe(nn.Module, LMHeadTransform):
    """The LM head's own parameters: dense (+tanh) when config.add_lm_hidden_dense_layer, the output bias, and the
    output weight only when it is not tied to the word embeddings. Its forward passes the hidden states on; the
    loss (`loss`) applies the head to the labelled rows only, as `MegaForCausalLM.lm_loss` does, so no
    (tokens x vocab) logits are materialised."""

    def __init__(self, config):
        super().__init__()
        self.init_lm_transform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.weight = (None if config.tie_word_embeddings
                       else nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size)))

    def forward(self, inputs: Activations) -> torch.Tensor:
        return split_activations(inputs)[0]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over positions whose label is not -100; `weight` is the tied word embedding."""
        weight = self.weight if self.weight is not None else weight
        return lm_head_loss(hidden, labels, self.transform, weight, self.bias, IGNORE_INDEX)


def tied_embedding_passthrough(embedding: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """forward_fn of the last stage's copy of the tied embedding: the copy is there for the loss's output
    projection (DeepSpeed keeps it equal to the first stage's and sums their gradients), so it passes the hidden
    states through unchanged."""
    return hidden
