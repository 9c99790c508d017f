"""Standard and feature-wise dropout as MEGA uses them."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# the geometric draw below wins while dropped elements are rare; above this rate drawing one number per element does
_GEOMETRIC_MAX_P = 0.25


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


def drop_mask(shape: Sequence[int], p: float, device=None) -> torch.Tensor:
    """The drops of `dropout(x, p)` for an x of `shape`, drawn ahead of applying them (`apply_drop_mask`), for code
    that keeps the mask rather than the dropped tensor: on CPU with p <= 0.25 the sorted flat positions of the drops
    (int64, `dropped_positions`), else a bool keep-mask of that shape (1 byte per element, as F.dropout keeps).
    Why draw only the drops on the CPU: its generator (a Mersenne Twister, one thread) is the cost of dropout
    there."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu":
        return torch.empty(tuple(shape), dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    if p <= _GEOMETRIC_MAX_P:
        return dropped_positions(math.prod(shape), p, device)
    # one uniform number per element, kept iff u >= p (P = 1 - p): outside MKL on Intel, bernoulli_ costs about
    # twice torch.rand per element on the CPU
    return torch.rand(tuple(shape), device=device) >= p


def apply_drop_mask(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """x with `drop_mask`'s drops zeroed and the rest scaled by 1/(1-p); differentiable in x, keeping only the
    mask. The same mask gives the same bits, which is what lets backward recompute a dropped tensor."""
    scale = 1.0 / (1.0 - p)
    if mask.dtype == torch.bool:
        # x * mask * scale in one pass; its derivative in x is itself, keeping the mask (as F.dropout's does)
        return torch.ops.aten.native_dropout_backward(x, mask, scale)
    return _PositionDropout.apply(x, mask, scale)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) in distribution: each element independently zeroed with probability p, the others
    scaled by 1/(1-p); drawn by `drop_mask` and applied by `apply_drop_mask`, so a region that draws its masks
    ahead (to recompute in backward, model/recompute.py) draws the very masks this would, on every device: a
    recomputation of a pass first run without autograd (reentrant activation checkpointing) drops the same
    elements. p = 1 and code being traced by torch.compile use F.dropout itself."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or torch.compiler.is_compiling():
        # p = 1: all zeros. Under torch.compile the geometric draw's data-dependent length (`dropped_positions`)
        # would break the graph in two at every dropout, and inductor generates its own fused mask anyway.
        return F.dropout(x, p, True)
    return apply_drop_mask(x, drop_mask(x.shape, p, x.device), p)


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

    def mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The drops of this dropout applied to x (`drop_mask`), drawn ahead; None when it would not drop (eval,
        p = 0). Feature-wise and p >= 1 dropout have no such mask: callers check `maskable` first."""
        if not self.training or self.dropout_probability == 0.0:
            return None
        return drop_mask(x.shape, self.dropout_probability, x.device)

    @property
    def maskable(self) -> bool:
        return not self.is_featurewise and self.dropout_probability < 1.0

    def apply_mask(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return x if mask is None else apply_drop_mask(x, mask, self.dropout_probability)

    def extra_repr(self) -> str:
        return f"p={self.dropout_probability}, featurewise={self.is_featurewise}"
