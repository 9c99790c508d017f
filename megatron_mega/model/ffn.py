"""MEGA's normalized feed-forward network (a two-layer MLP with its own norm and residual)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_mega.model.activations import get_activation
from megatron_mega.model.dropout import MegaDropout
from megatron_mega.model.norms import MegaSequenceNorm


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
        self.fc2 = nn.Linear(config.nffn_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.prenorm:
            x = self.norm(x)
        hidden = self.hidden_dropout(self.activation(self.fc1(x)))
        out = self.dropout(self.fc2(hidden)) + residual
        if not self.prenorm:
            out = self.norm(out)
        return out
