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
from typing import Callable, Optional, Sequence

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


# ---------------------------------------------------------------------------------------------- replaying in backward
# shared by the autograd functions that rebuild something in backward from what they kept: the regions here,
# model/recomputed_linear.py's input, model/fft_conv.py's kernel

def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast state forward ran under, for `replay`: backward runs outside it, or under whatever autocast
    region it was called from."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def replay(fn: Callable, inputs: Sequence[Optional[torch.Tensor]], needs: Sequence[bool], autocast: tuple):
    """fn run again on fresh leaves of `inputs` (requiring grad where `needs` says), with autograd on when any does
    and under forward's autocast state, so that it gives forward's values to the bit. Returns (result, leaves)."""
    leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
    device, enabled, dtype = autocast
    with torch.set_grad_enabled(any(needs)), torch.autocast(device, dtype=dtype, enabled=enabled):
        return fn(*leaves), leaves


def leaf_grads(out: torch.Tensor, leaves: Sequence[Optional[torch.Tensor]], grad: torch.Tensor) -> list:
    """The gradient of each of `replay`'s leaves that requires one (None for the others), given out's gradient.
    autograd.grad, not backward: only the leaves get gradients, never a tensor the replayed function closes over."""
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
    return [next(found) if leaf is not None and leaf.requires_grad else None for leaf in leaves]


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
        with _replaying(True):
            out, leaves = replay(ctx.fn, ctx.saved_tensors, ctx.needs_input_grad[2:], ctx.autocast)
        return None, None, *leaf_grads(out, leaves, grad)


@contextlib.contextmanager
def _replaying(active: bool):
    previous = getattr(_replay, "active", False)
    _replay.active = active
    try:
        yield
    finally:
        _replay.active = previous


def recomputing() -> bool:
    """Whether backward could recompute here (autograd on, not being traced by torch.compile): `recomputed` and
    every other rebuild-in-backward of the model (gates, recomputed linears, the EMA's kernel) run their plain
    expression otherwise; callers that pre-draw dropout masks for a region check this first."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def recomputed(fn: Callable[..., torch.Tensor], *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """fn(*inputs), keeping only `inputs` for backward (see the module docstring). One tensor out."""
    if not recomputing():
        return fn(*inputs)
    device = next(t for t in inputs if t is not None).device.type
    return _Recomputed.apply(fn, autocast_state(device), *inputs)
