"""Activation functions by the names MegaConfig uses (transformers' ACT2FN names)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# MEGA's laplace attention: the normal CDF with mean sqrt(1/2) and std sqrt(1/(4 pi)), the constants of the paper,
# chosen so that laplace approximates relu^2 near 0 while staying bounded.
_LAPLACE_MU = 0.707107
_LAPLACE_SIGMA = 0.282095


def laplace(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf((x - _LAPLACE_MU) / (_LAPLACE_SIGMA * math.sqrt(2.0))))


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
    "laplace": laplace,
    "relu2": relu2,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
