"""Standard and feature-wise dropout as MEGA uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout_noise(like: torch.Tensor, p: float) -> torch.Tensor:
    """The multiplier of standard dropout: 1/(1-p) with probability 1-p, else 0, one per element of `like`.

    Same distribution as F.dropout's, drawn faster on CPU: F.dropout draws its mask with bernoulli_, which (outside
    MKL on Intel) costs about twice torch.rand per element, then divides and multiplies in separate passes. Here one
    uniform draw per element, compared and scaled in place: keep iff u >= p, P(keep) = 1 - p for u uniform in [0, 1).
    The result does not require grad, so `x * noise` saves only the noise for backward, as F.dropout does."""
    noise = torch.rand(like.shape, dtype=like.dtype, device=like.device)
    return noise.ge_(p).mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the mask drawn by `dropout_noise` (p = 1 falls back to F.dropout's zeros)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return F.dropout(x, p, True)
    return x * dropout_noise(x, p)


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
        return dropout(x, self.dropout_probability)

    def extra_repr(self) -> str:
        return f"p={self.dropout_probability}, featurewise={self.is_featurewise}"
