"""A Linear whose input is recomputed in backward from the tensors it was made of, instead of being kept.

Autograd of `linear(x)` keeps x until backward (for the weight's gradient). In MEGA two linears read the output of
an elementwise step whose inputs are at hand: h_proj reads attended * silu(gate), fc2 reads
dropout(silu(fc1 output)). Autograd keeps those inputs for the elementwise step's own backward and then x as well:
4 KiB per token and layer each at the 1024-wide GPU anchor (v = nffn = 2048, bfloat16). Here the step (the
"prologue") and the linear are one autograd node that keeps only the prologue's inputs; backward reruns the
prologue (one elementwise pass) and hands its inputs the gradients autograd of the prologue gives.

The linear stays an nn.Linear (same parameters, names and plain forward) and is called as a module, so hooks
that act around a module's forward and backward (DeepSpeed ZeRO-3 gathering its partitioned weight) see it as
before. Its weight is cast to the autocast dtype before the node, as autocast would, so the float32 weight's
gradient is the bfloat16 product cast back, as under autocast; the node's products are those of addmm's backward
(the same calls), so values and gradients equal autograd of `linear(prologue(*inputs))` to the bit
(tests/model/test_recompute.py). Under torch.compile or without autograd the plain expression runs:
inductor's partitioner makes the keep-or-recompute choice for the whole block itself.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from megatron_mega.model.recompute import autocast_state, leaf_grads, recomputing, replay


class _RecomputedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prologue: Callable, autocast: tuple, weight: torch.Tensor, bias: Optional[torch.Tensor],
                *inputs: torch.Tensor) -> torch.Tensor:
        x = prologue(*inputs)
        ctx.prologue, ctx.autocast = prologue, autocast
        ctx.save_for_backward(weight, *inputs)
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, *inputs = ctx.saved_tensors
        x, leaves = replay(lambda *xs: ctx.prologue(*xs).to(weight.dtype), inputs, ctx.needs_input_grad[4:],
                           ctx.autocast)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        x_2d = x.detach().reshape(-1, x.shape[-1])
        # addmm's backward for linear(x) = addmm(bias, x, weight.t()): the same products, so the same bits
        grad_weight = grad_2d.t().mm(x_2d) if ctx.needs_input_grad[2] else None
        grad_bias = grad_2d.sum(0) if ctx.needs_input_grad[3] else None
        grad_x = grad_2d.mm(weight).view(x.shape) if any(ctx.needs_input_grad[4:]) else None
        return None, None, grad_weight, grad_bias, *leaf_grads(x, leaves, grad_x)


class RecomputedInputLinear(nn.Linear):
    """nn.Linear; `layer(*inputs, prologue=f)` is `layer(f(*inputs))` keeping `inputs` for backward instead of
    f(*inputs). f must be deterministic given its inputs (dropout masks come in as inputs) and elementwise-cheap.
    `recompute = False` keeps the input as nn.Linear does (model/block.py's `set_selective_recompute`)."""

    recompute = True

    def forward(self, *inputs: Optional[torch.Tensor], prologue: Optional[Callable] = None) -> torch.Tensor:
        if prologue is None:
            (x,) = inputs
            return F.linear(x, self.weight, self.bias)
        if not self.recompute or not recomputing():
            return F.linear(prologue(*inputs), self.weight, self.bias)
        weight, bias = self.weight, self.bias
        autocast = autocast_state(self.weight.device.type)
        if autocast[1]:
            weight = weight.to(autocast[2])
            bias = None if bias is None else bias.to(autocast[2])
        return _RecomputedInputLinear.apply(prologue, autocast, weight, bias, *inputs)
