"""Normalisation layers of MEGA. Inputs are batch-first: (batch, seq, hidden).

`MegaSequenceNorm` wraps the chosen norm as `.norm` so state-dict names match transformers
(`...norm.norm.scalar`, `...norm.norm.weight`).
"""

from __future__ import annotations

import torch
from torch import nn


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
        return self.norm(x)
