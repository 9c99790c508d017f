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


class _PerLayer:
    """What transformers' generation asks of a cache: its layers by index, and the positions it has consumed."""

    layers: list
    seen_tokens: int

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int):
        return self.layers[index]

    def get_seq_length(self) -> int:
        return self.seen_tokens


@dataclass
class MegaCache(_PerLayer):
    """The model's cache: one MegaLayerCache per layer and the number of positions consumed."""

    layers: list[MegaLayerCache] = field(default_factory=list)
    seen_tokens: int = 0

    def select(self, index: torch.Tensor) -> "MegaCache":
        return MegaCache([layer.select(index) for layer in self.layers], self.seen_tokens)

    def reorder_cache(self, beam_idx: torch.Tensor) -> "MegaCache":
        return self.select(beam_idx)


def static_cache_size(config, max_length: int) -> int:
    """The slots per layer a static cache of `config`'s model needs for a sequence of up to `max_length` tokens:
    the chunk size when chunking (the open chunk's), else every position."""
    return config.chunk_size if config.use_chunking else max_length


@dataclass
class MegaStaticLayerCache:
    """A layer's decoding state in buffers of fixed shape, updated in place: what a CUDA graph of a decoding step
    needs (every step reads and writes the same memory, and no shape depends on how many tokens came before).

    The open chunk's keys and values sit in `size` slots (the chunk size; without chunking, room for every position
    of the sequence); the token at position t goes to slot t % size. A slot past the current one holds a finished
    chunk's key (or nothing yet) and is never visible."""

    key: torch.Tensor  # (B, S, z)
    value: torch.Tensor  # (B, S, v)
    filled: torch.Tensor  # (B, S) bool: the slot holds a real (not padding) token
    ema_state: torch.Tensor  # (B, D, N)
    position: torch.Tensor  # () int64, shared by all layers: the tokens consumed so far

    @property
    def size(self) -> int:
        return self.key.shape[1]


@dataclass
class MegaStaticCache(_PerLayer):
    """The model's cache in fixed-shape buffers (`MegaStaticLayerCache`), advanced in place by each step.

    Made from the dynamic cache of a prefill (`from_cache`); `seen_tokens` is kept on the host for the model's checks,
    `position` on the device for the step itself (a replayed CUDA graph advances the one, its runner the other)."""

    layers: list[MegaStaticLayerCache]
    seen_tokens: int
    position: torch.Tensor

    @classmethod
    def from_cache(cls, cache: MegaCache, size: int) -> "MegaStaticCache":
        """Copies a dynamic cache into buffers of `size` slots: the chunk size, or without chunking at least the
        length the sequence will reach."""
        if not cache.layers:
            raise ValueError("an empty cache: prefill with use_cache=True first")
        held = cache.layers[0].key.shape[1]
        if held > size or held != cache.seen_tokens % size:
            raise ValueError(f"a cache holding {held} keys after {cache.seen_tokens} tokens does not fit {size} "
                             f"slots: size is the chunk size, or without chunking the final sequence length")
        first = cache.layers[0].key
        position = torch.tensor(cache.seen_tokens, dtype=torch.int64, device=first.device)
        layers = []
        for layer in cache.layers:
            batch = layer.key.shape[0]
            key = layer.key.new_zeros(batch, size, layer.key.shape[2])
            value = layer.value.new_zeros(batch, size, layer.value.shape[2])
            filled = torch.zeros(batch, size, dtype=torch.bool, device=first.device)
            key[:, :held], value[:, :held] = layer.key, layer.value
            filled[:, :held] = True if layer.key_mask is None else layer.key_mask
            layers.append(MegaStaticLayerCache(key, value, filled, layer.ema_state.clone(), position))
        return cls(layers, cache.seen_tokens, position)

    def check_step(self, config, length: int, use_cache: Optional[bool] = None, training: bool = False,
                   output_attentions: bool = False) -> None:
        """Refuses what a static step cannot do, before any buffer is written: it takes one token, without
        autograd or dropout (it overwrites in place what a backward would read), advances the cache (use_cache),
        and attends in the chunk's own slots (size = chunk_size) or, unchunked, within the room it has."""
        problem = None
        if length != 1:
            problem = (f"takes one token per step, got {length}: prefill with a dynamic cache (use_cache=True), "
                       "then MegaStaticCache.from_cache")
        elif torch.is_grad_enabled() or training:
            problem = "decodes without autograd or dropout: call it under torch.no_grad() with model.eval()"
        elif use_cache is False:
            problem = "is advanced by every step it is passed to: use_cache=False cannot be honoured"
        elif output_attentions:
            problem = "does not return attention weights: decode with the dynamic cache for output_attentions"
        elif config.use_chunking and self.layers[0].size != config.chunk_size:
            problem = (f"has {self.layers[0].size} slots per layer; a chunked model needs chunk_size = "
                       f"{config.chunk_size}: MegaStaticCache.from_cache(cache, config.chunk_size)")
        if problem:
            raise ValueError(f"a static cache {problem}")
        self.check_room(config, length)

    def check_room(self, config, length: int) -> None:
        """Refuses a step of `length` tokens that an unchunked cache has no slots left for (a chunked one reuses its
        slots chunk after chunk). Also what a replayed CUDA graph's runner checks, where no model code runs."""
        if not config.use_chunking and self.seen_tokens + length > self.layers[0].size:
            raise ValueError(f"a static cache has room for {self.layers[0].size} positions; this step would reach "
                             f"{self.seen_tokens + length}: make it from the dynamic cache with a larger size")

    def advance(self, length: int) -> None:
        self.position.add_(length)
        self.seen_tokens += length

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every buffer, for `restore` (a CUDA graph's warm-up steps must leave the state as it was)."""
        return [t.clone() for t in self._buffers()]

    def restore(self, snapshot: list[torch.Tensor], seen_tokens: int) -> None:
        for buffer, saved in zip(self._buffers(), snapshot):
            buffer.copy_(saved)
        self.seen_tokens = seen_tokens

    def _buffers(self) -> list[torch.Tensor]:
        return [self.position] + [t for layer in self.layers
                                  for t in (layer.key, layer.value, layer.filled, layer.ema_state)]
