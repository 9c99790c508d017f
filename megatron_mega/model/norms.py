"""Normalisation layers of MEGA. Inputs are batch-first: (batch, seq, hidden).

`MegaSequenceNorm` wraps the chosen norm as `.norm` so state-dict names match transformers
(`...norm.norm.scalar`, `...norm.norm.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# at most this many rows (tokens) take the single-op path of a decoding step
_FEW_ROWS = 64
_HALF = (torch.bfloat16, torch.float16)


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a norm's row statistics and their gradients are formed in: float32 for half-precision inputs."""
    return torch.float32 if x.dtype in _HALF else x.dtype


class _ScaleNormFunction(torch.autograd.Function):
    """y = s * x * rsqrt(mean(x^2, last dim) + eps) with a hand-written backward.

    Autograd of the plain expression saves x, x^2's mean, the scaled x and more, and walks full-size tensors about
    ten times in backward; here forward takes two passes (a norm reduction that allocates no x^2, one multiply) and
    backward three (a dot product per row, one multiply, one fused multiply-add), saving only x and the per-row
    rsqrt:
        r = rsqrt(mean(x^2) + eps),   dx = s * r * (g - x * r^2 * mean(g * x)),   ds = sum(g * x * r)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scalar, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        # ||x||^2 / D: a single reduction over x, no full-size x^2 temporary; the row statistics in float32 at
        # least (F.rms_norm's precision: bfloat16 statistics put 2x its rounding error on every output)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=_stats_dtype(x)).square_().div_(dim)
        rsqrt = mean_square.add_(eps).rsqrt_()
        factor = rsqrt if scalar is None else rsqrt * scalar
        ctx.save_for_backward(x, rsqrt, scalar)
        ctx.has_scalar = scalar is not None
        return (x * factor).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rsqrt, scalar = ctx.saved_tensors
        dim = x.shape[-1]
        dtype = grad.dtype
        if x.dtype != rsqrt.dtype:
            # half precision: g - x r^2 mean(g x) cancels where g points along x, so it is formed in float32 (the
            # CPU's half-precision path only: CUDA takes F.rms_norm, whose backward accumulates in float32)
            x, grad = x.to(rsqrt.dtype), grad.to(rsqrt.dtype)
        grad_x_prod = grad * x
        row_dot = grad_x_prod.sum(dim=-1, keepdim=True)  # sum_d g * x, per row
        grad_scalar = None
        if ctx.has_scalar and ctx.needs_input_grad[1]:
            grad_scalar = (row_dot * rsqrt).sum().reshape(scalar.shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            factor = rsqrt if scalar is None else rsqrt * scalar  # s * r
            correction = factor * rsqrt.square() * row_dot / dim  # s * r^3 * mean(g * x)
            # reuse the product's buffer: dx = g * (s r) - x * (s r^3 mean(g x))
            grad_x = torch.mul(grad, factor, out=grad_x_prod).addcmul_(x, correction, value=-1.0).to(dtype)
        if grad_scalar is not None:
            grad_scalar = grad_scalar.to(scalar.dtype)
        return grad_x, grad_scalar, None


class MegaScaleNorm(nn.Module):
    """x / rms(x) times one learned scalar (MEGA's default norm)."""

    def __init__(self, dim: int = -1, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.affine = affine
        if affine:
            self.scalar = nn.Parameter(torch.ones(1))
        else:
            self.register_parameter("scalar", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim in (-1, x.dim() - 1):
            width = x.shape[-1]
            if x.is_cuda or x.numel() <= _FEW_ROWS * width:
                # CUDA: F.rms_norm is one fused kernel forward and one backward (aten._fused_rms_norm, autocast's
                # float32 list) against the function's two and three. The CPU, a few rows (a decoding step) only:
                # each op's fixed cost is the time there, one op against six; on large inputs it decomposes into
                # passes with an x^2 temporary. Chosen by device and size, not by autograd, so that one input gives
                # the same bits with and without it.
                weight = None if self.scalar is None else self.scalar.expand(width)
                return F.rms_norm(x, (width,), weight, self.eps)
            return _ScaleNormFunction.apply(x, self.scalar, self.eps)
        mean_square = torch.mean(torch.square(x), dim=self.dim, keepdim=True)
        if self.scalar is not None:
            x = self.scalar * x
        return x * torch.rsqrt(mean_square + self.eps)


class MegaRMSNorm(nn.Module):
    """x / rms(x) times a learned vector. (transformers 4.57.6 drops the normalisation: its defect 1.)"""

    def __init__(self, number_features: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.num_features = number_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(number_features))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = torch.mean(torch.square(x), dim=-1, keepdim=True)
        out = x * torch.rsqrt(mean_square + self.eps)
        if self.weight is not None:
            out = out * self.weight
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class MegaSequenceNorm(nn.Module):
    """One of layernorm, scalenorm, rmsnorm, batchnorm, syncbatchnorm over the hidden dimension."""

    def __init__(self, norm_type: str, embedding_dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if norm_type == "layernorm":
            self.norm = nn.LayerNorm(embedding_dim, eps, elementwise_affine=affine)
        elif norm_type == "scalenorm":
            self.norm = MegaScaleNorm(dim=-1, eps=eps, affine=affine)
        elif norm_type == "rmsnorm":
            self.norm = MegaRMSNorm(embedding_dim, eps=eps, affine=affine)
        elif norm_type == "batchnorm":
            self.norm = nn.BatchNorm1d(embedding_dim, eps=eps, affine=affine)
        elif norm_type == "syncbatchnorm":
            self.norm = nn.SyncBatchNorm(embedding_dim, eps=eps, affine=affine)
        else:
            raise ValueError(f"unknown normalization_type {norm_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            # batch norms want channels second: (B, L, D) -> (B, D, L), statistics over batch and time
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        if isinstance(self.norm, nn.LayerNorm) and x.dtype in _HALF and x.device.type == "cpu":
            # the CPU's half-precision layer_norm backward sums the weight's and bias's gradients over the rows in
            # low precision: 2e-2 off at 640 rows, 5e-2 at 4096 (torch 2.13), against 2e-3 for float32 rounded once.
            # In float32 and back: those of the parameters' dtype
            norm = self.norm
            weight = None if norm.weight is None else norm.weight.float()
            bias = None if norm.bias is None else norm.bias.float()
            return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)
        return self.norm(x)
