"""Elementwise regions that keep only their inputs for backward and recompute the rest.

A gate such as `addcmul(r, sigmoid(g), o - r)` makes autograd keep sigmoid(g) and the float32 difference o - r,
tensors of the full activation size, although r, g and o are kept anyway (by the norm, the projection that made
g, the layer before). Recomputing a few elementwise ops in backward costs one pass over memory; keeping their
results costs bytes for every layer until backward reaches it, which is what bounds the sequence length. The
recomputation runs the same ops under the same autocast state, so values and gradients are bit-identical to
autograd of the plain expression.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor):
    """fn(*args), keeping only `args` for backward. `fn` must be deterministic (no dropout: its random state is not
    replayed) and elementwise-cheap: it runs twice when autograd records it."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
