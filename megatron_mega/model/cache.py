"""Decoding state of MEGA: per layer the EMA state and the keys/values of the current chunk only.

That is all a causal MEGA needs to continue a sequence: the EMA summarises everything before, and attention reaches
back no further than the start of the current chunk, so the cache (and the cost of a step) stays bounded by the chunk
size whatever the context length. Without chunking the keys of the whole context are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class MegaLayerCache:
    key: torch.Tensor  # (B, P, z): keys of the positions of the current chunk seen so far
    value: torch.Tensor  # (B, P, v)
    key_mask: Optional[torch.Tensor]  # (B, P) bool, True = real token; None = no padding among them
    ema_state: torch.Tensor  # (B, D, N)

    def select(self, index: torch.Tensor) -> "MegaLayerCache":
        """Reorder or subset the batch (beam search, dropping finished rows)."""
        return MegaLayerCache(
            self.key.index_select(0, index), self.value.index_select(0, index),
            None if self.key_mask is None else self.key_mask.index_select(0, index),
            self.ema_state.index_select(0, index))


@dataclass
class MegaCache:
    """The model's cache: one MegaLayerCache per layer and the number of positions consumed."""

    layers: list[MegaLayerCache] = field(default_factory=list)
    seen_tokens: int = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> MegaLayerCache:
        return self.layers[index]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def select(self, index: torch.Tensor) -> "MegaCache":
        return MegaCache([layer.select(index) for layer in self.layers], self.seen_tokens)

    def reorder_cache(self, beam_idx: torch.Tensor) -> "MegaCache":
        return self.select(beam_idx)
