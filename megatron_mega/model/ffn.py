"""MEGA's normalized feed-forward network (a two-layer MLP with its own norm and residual)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_mega.model.activations import get_activation
from megatron_mega.model.dropout import MegaDropout
from megatron_mega.model.norms import MegaSequenceNorm
from megatron_mega.model.recompute import recomputing
from megatron_mega.model.recomputed_linear import RecomputedInputLinear


class MegaNormalizedFeedForwardNetwork(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.prenorm = config.normalize_before_ffn
        self.activation = get_activation(config.activation)
        self.dropout = MegaDropout(config.dropout_prob, is_featurewise=config.use_feature_dropout)
        self.hidden_dropout = MegaDropout(config.nffn_activation_dropout_prob,
                                          is_featurewise=config.use_feature_dropout)
        self.norm = MegaSequenceNorm(config.normalization_type, config.hidden_size, affine=config.norm_affine)
        self.fc1 = nn.Linear(config.hidden_size, config.nffn_hidden_size)
        self.fc2 = RecomputedInputLinear(config.nffn_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.prenorm:
            x = self.norm(x)
        hidden = self.fc1(x)
        if self.fc2.recompute and self.hidden_dropout.maskable and recomputing():
            # fc2 keeps fc1's output and the drops for backward, not the activated and dropped copy it reads
            # (model/recomputed_linear.py)
            projected = self.fc2(hidden, self.hidden_dropout.mask_for(hidden), prologue=self._activate_and_drop)
        else:
            projected = self.fc2(self.hidden_dropout(self.activation(hidden)))
        out = self.dropout(projected) + residual
        if not self.prenorm:
            out = self.norm(out)
        return out

    def _activate_and_drop(self, hidden: torch.Tensor, mask) -> torch.Tensor:
        return self.hidden_dropout.apply_mask(self.activation(hidden), mask)
