"""Relative positional biases added to MEGA's attention scores.

Both return bias[i, j] for query positions i and key positions j (positions inside the current chunk), so a
decoding step asks only for its own row instead of building a chunk x chunk matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_mega.model.derived import DerivedTensors, memoising_active


class MegaSimpleRelativePositionalBias(nn.Module):
    """A learned scalar per relative distance j - i.

    The parameter has 2 * max_positions - 1 entries (transformers' layout). Its centre is chunk_size - 1 when chunking
    (where transformers reads it, so its checkpoints keep their meaning) and max_positions - 1 otherwise; distances
    beyond the learned range reuse the outermost entry instead of failing (transformers' defect 4).
    """

    def __init__(self, config):
        super().__init__()
        self.max_positions = config.max_positions
        self.center = (config.chunk_size if config.use_chunking else config.max_positions) - 1
        self.rel_pos_bias = nn.Parameter(torch.empty(2 * config.max_positions - 1))

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        distance = key_positions.view(1, -1) - query_positions.view(-1, 1)
        index = (distance + self.center).clamp(0, self.rel_pos_bias.numel() - 1)
        return self.rel_pos_bias[index]


class MegaRotaryRelativePositionalBias(nn.Module):
    """bias[i, j] = <rotate(alpha, i), rotate(beta, j)>: depends on j - i only, extends to any length."""

    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.shared_representation_size
        self.alpha = nn.Parameter(torch.empty(1, self.embed_dim))
        self.b_param = nn.Parameter(torch.empty(1, self.embed_dim))
        # carried for transformers' state-dict layout (it holds the dtype/device of the sinusoid tables there)
        self.register_buffer("_float_tensor", torch.zeros(1))
        self._alpha_table, self._beta_table = DerivedTensors(), DerivedTensors()

    def _rotate(self, vector: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        half = self.embed_dim // 2
        frequencies = torch.exp(
            torch.arange(half, device=vector.device, dtype=torch.float32) * -(math.log(10000.0) / half))
        angles = positions.to(torch.float32).view(-1, 1) * frequencies.view(1, -1)  # (P, half)
        sin, cos = torch.sin(angles).to(vector.dtype), torch.cos(angles).to(vector.dtype)
        first, second = vector[..., :half], vector[..., half:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    def _rotated(self, vector: torch.Tensor, positions: torch.Tensor, derived: DerivedTensors,
                 size: int) -> torch.Tensor:
        """_rotate(vector, positions); while decoding, rows of a memoised table of positions 0 .. size-1 (a power
        of two >= size; the same numbers: the rotation is elementwise per position)."""
        if not memoising_active():
            return self._rotate(vector, positions)
        size = 1 << max(0, (size - 1).bit_length())
        table = derived.get((vector,), size, lambda: self._rotate(vector, torch.arange(size, device=vector.device)))
        return table.index_select(0, positions)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Positions are in [0, max(len(query_positions), len(key_positions))), as the attention asks for them."""
        size = max(query_positions.numel(), key_positions.numel())
        rotated_alpha = self._rotated(self.alpha, query_positions, self._alpha_table, size)  # (Q, z)
        rotated_beta = self._rotated(self.b_param, key_positions, self._beta_table, size)  # (K, z)
        return rotated_alpha @ rotated_beta.transpose(0, 1)


def build_relative_positional_bias(config) -> nn.Module:
    if config.relative_positional_bias == "simple":
        return MegaSimpleRelativePositionalBias(config)
    if config.relative_positional_bias == "rotary":
        return MegaRotaryRelativePositionalBias(config)
    raise ValueError(f"unknown relative_positional_bias {config.relative_positional_bias!r}")
