"""A region of the forward pass whose intermediates are recomputed in backward instead of kept.

`recomputed(fn, *inputs)` is fn(*inputs) for values and gradients, but autograd keeps only `inputs` (usually kept
anyway by their other users) rather than every intermediate of fn; backward runs fn again with autograd on and
back-propagates through that copy. This is activation checkpointing of one small region. torch.utils.checkpoint
does the same but costs ~0.5 ms of Python per call (its saved-tensor hooks and RNG bookkeeping), which on the CPU
benchmark's small layers was 3-4% of a step; this costs one autograd.Function.

A region whose result is a product of two of its tensors computes it with `product`: the replay skips it.
fn must give the same result from the same inputs: randomness (dropout) comes in as pre-drawn masks
(model/dropout.py's `drop_mask`). Tensors fn closes over are not inputs: it must not close over anything that
needs a gradient (pass such tensors as inputs). The replay runs under the autocast state of the forward.
Under torch.compile or without autograd fn runs plainly: inductor's partitioner makes its own keep-or-recompute
choice for the whole block.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

_replay = threading.local()


class _UnreadProduct(torch.autograd.Function):
    """a @ b in a replay, where only gradients are wanted: its value is never read, so it is not computed (an
    uninitialised tensor of the product's shape stands in) and backward is a @ b's."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return a.new_empty(*batch, a.shape[-2], b.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = torch.matmul(grad, b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.matmul(a.transpose(-1, -2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul(a, b) for a region's last product: when backward replays the region, the product's value is
    not needed (only its inputs' gradients), and skipping it saves the region's largest matrix multiply (the
    attention's weights times values: 8x the scores' FLOPs at v = 8z)."""
    if not getattr(_replay, "active", False):
        return torch.matmul(a, b)
    device = a.device.type
    if torch.is_autocast_enabled(device):  # the casts autocast would make, so that gradients come out alike
        dtype = torch.get_autocast_dtype(device)
        a, b = a.to(dtype), b.to(dtype)
    return _UnreadProduct.apply(a, b)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, autocast: tuple, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.fn, ctx.autocast = fn, autocast
        ctx.save_for_backward(*inputs)
        with _replaying(False):  # a region entered inside another's replay computes its value: it is read
            return fn(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
            device, enabled, dtype = ctx.autocast
            with _replaying(True), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.fn(*leaves)
        wanted = [leaf for leaf, need in zip(leaves, needs) if leaf is not None and need]
        # autograd.grad, not backward: only the leaves get gradients, never a tensor fn might close over
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (None, None, *(next(grads) if leaf is not None and need else None for leaf, need in zip(leaves, needs)))


@contextlib.contextmanager
def _replaying(active: bool):
    previous = getattr(_replay, "active", False)
    _replay.active = active
    try:
        yield
    finally:
        _replay.active = previous


def recomputing() -> bool:
    """Whether `recomputed` would recompute here (autograd on, not being traced by torch.compile); callers that
    pre-draw dropout masks for a region check this first and keep their plain path otherwise."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def recomputed(fn: Callable[..., torch.Tensor], *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """fn(*inputs), keeping only `inputs` for backward (see the module docstring). One tensor out."""
    if not recomputing():
        return fn(*inputs)
    device = next(t for t in inputs if t is not None).device.type
    autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return _Recomputed.apply(fn, autocast, *inputs)
