"""Standard and feature-wise dropout as MEGA uses them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# the geometric draw below wins while dropped elements are rare; above this rate drawing one number per element does
_GEOMETRIC_MAX_P = 0.25


def dropout_noise(like: torch.Tensor, p: float) -> torch.Tensor:
    """The multiplier of standard dropout: 1/(1-p) with probability 1-p, else 0, one per element of `like`.

    Same distribution as F.dropout's, drawn faster on CPU: F.dropout draws its mask with bernoulli_, which (outside
    MKL on Intel) costs about twice torch.rand per element, then divides and multiplies in separate passes. Here one
    uniform draw per element, compared and scaled in place: keep iff u >= p, P(keep) = 1 - p for u uniform in [0, 1).
    The result does not require grad, so `x * noise` saves only the noise for backward, as F.dropout does."""
    noise = torch.rand(like.shape, dtype=like.dtype, device=like.device)
    return noise.ge_(p).mul_(1.0 / (1.0 - p))


def _draw_count(mean: float, first: bool) -> int:
    # 8 standard deviations above the expected number of drops: a second draw is (almost) never needed
    return int(mean + 8.0 * math.sqrt(mean) + 64) if first else int(mean / 8) + 64


def dropped_positions(numel: int, p: float, device=None) -> torch.Tensor:
    """Sorted flat indices of the dropped elements of `numel` i.i.d. Bernoulli(p) drops, drawn as geometric gaps.

    Between two drops, the number of kept elements of an i.i.d. Bernoulli(p) sequence is geometric,
    P(gap = k) = (1-p)^k p, which is floor(log(1 - u) / log(1 - p)) for u uniform in [0, 1) (u in float64: the tail
    is exact to ~1e-16). So ~numel * p draws give the whole mask, instead of numel draws: the Mersenne Twister of the
    CPU generator, one thread, is the cost of dropout there."""
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    mean = numel * p
    chunks, end = [], -1
    while end < numel - 1:
        count = _draw_count(mean, first=not chunks)
        u = torch.rand(count, dtype=torch.float64, device=device)
        gaps = torch.log1p(u.neg_()).div_(math.log1p(-p)).floor_().add_(1.0).to(torch.int64)
        positions = torch.cumsum(gaps, 0).add_(end)  # the gap before each drop, plus the drop itself
        chunks.append(positions)
        end = int(positions[-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[:int(torch.searchsorted(positions, numel))]


class _PositionDropout(torch.autograd.Function):
    """x * 1/(1-p) with the given flat positions zeroed; backward the same on the gradient. Saves only the positions
    (~p * numel indices), not a full-size mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _scale_and_zero(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _scale_and_zero(grad, positions, ctx.scale), None, None


def _scale_and_zero(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    # a row-major output, so that flat positions index it whatever the input's strides
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, scale, out=out)
    return out.view(-1).index_fill_(0, positions, 0.0).view(x.shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) in distribution: each element independently zeroed with probability p, the others
    scaled by 1/(1-p). On CPU with p <= 0.25 the drops are drawn as geometric gaps (`dropped_positions`), else as one
    uniform number per element (`dropout_noise`); other devices, p = 1 and code being traced by torch.compile use
    F.dropout itself."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
        # accelerators: one fused kernel with a fast counter-based generator; p = 1: all zeros. Under torch.compile
        # the geometric draw's data-dependent length (`dropped_positions`) would break the graph in two at every
        # dropout, and inductor generates its own fused mask anyway.
        return F.dropout(x, p, True)
    if p <= _GEOMETRIC_MAX_P:
        return _PositionDropout.apply(x, dropped_positions(x.numel(), p, x.device), 1.0 / (1.0 - p))
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
