"""Standard and feature-wise dropout as MEGA uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MegaDropout(nn.Module):
    """Dropout; with `is_featurewise`, one mask per (sample, feature) shared over all time steps.

    Input is batch-first (batch, seq, features); feature-wise dropout zeroes whole channels of a sample, which is the
    fairseq MEGA's FeatureDropout.
    """

    def __init__(self, dropout_probability: float, is_featurewise: bool = False):
        super().__init__()
        self.dropout_probability = dropout_probability
        self.is_featurewise = is_featurewise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_probability == 0.0:
            return x
        if self.is_featurewise:
            # (B, L, D) -> (B, D, L): dropout1d drops entire channels of each sample
            return F.dropout1d(x.transpose(1, 2), p=self.dropout_probability, training=True).transpose(1, 2)
        return F.dropout(x, p=self.dropout_probability, training=True)

    def extra_repr(self) -> str:
        return f"p={self.dropout_probability}, featurewise={self.is_featurewise}"
