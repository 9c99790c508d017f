"""MEGA's elementwise gates (MEGA section 3.3) as autograd functions that keep only their inputs for backward.

Autograd of the plain expressions keeps each activated gate (sigmoid of the residual gate, silu of the query-key
gate) and the float32 difference `out - residual`: full-size tensors for every layer until backward reaches it,
although the inputs they come from are kept anyway (the mx_proj output, the layer's input).
These functions recompute the activations in backward instead: one more elementwise pass, against 4.5 KiB per token
and layer at the 1024-wide GPU anchor. (The attention gate, attended * silu(gate), is recomputed by h_proj, which
reads it: model/recomputed_linear.py.) Their forward runs the plain expression and their backward the derivatives
autograd would (the same ops, dtypes and rounding), so each gives the values and gradients of autograd of its plain
expression to the bit (tests/model/test_gates.py).

Under torch.compile the plain expressions are traced instead: inductor's partitioner makes the same keep-or-
recompute choice for the whole block and fuses the recomputation into its backward kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_mega.model.recompute import recomputing

_silu_backward = torch.ops.aten.silu_backward
_sigmoid_backward = torch.ops.aten.sigmoid_backward


def query_key_plain(gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    # one shared representation Z = silu(gate), two per-dimension affine maps to query and key. The affine maps
    # run in Z's dtype: under autocast Z is bfloat16 and float32 parameters would promote the (tokens x z) query and
    # key to float32, which the attention's matmuls then cast back (four more passes, forward and backward); the
    # parameters are cast instead, as autocast casts a Linear's weight.
    weight, bias = weight.to(gate.dtype), bias.to(gate.dtype)
    shared = F.silu(gate)
    return torch.addcmul(bias[0], shared, weight[0]), torch.addcmul(bias[1], shared, weight[1])


def gate_values_plain(attended: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return attended * F.silu(gate)


def gated_residual_plain(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # residual + sigmoid(gate) * (out - residual)
    return torch.addcmul(residual, torch.sigmoid(gate), out - residual)


class _QueryKey(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, weight, bias):
        ctx.save_for_backward(gate, weight)
        return query_key_plain(gate, weight, bias)

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        gate, weight = ctx.saved_tensors
        shared = F.silu(gate)
        cast = weight.to(gate.dtype)  # what forward multiplied by
        grad_shared = None
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(weight)
        for i, grad in enumerate((grad_query, grad_key)):
            if grad is None:
                continue
            part = grad * cast[i]
            grad_shared = part if grad_shared is None else grad_shared + part
            grad_weight[i] = (grad * shared).sum_to_size(weight[i].shape)
            grad_bias[i] = grad.sum_to_size(weight[i].shape)
        grad_gate = None if grad_shared is None else _silu_backward(grad_shared, gate)
        return grad_gate, grad_weight, grad_bias


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, gate, out):
        ctx.save_for_backward(residual, gate, out)
        return gated_residual_plain(residual, gate, out)

    @staticmethod
    def backward(ctx, grad):
        residual, gate, out = ctx.saved_tensors
        weight = torch.sigmoid(gate)
        grad_out_term = grad * weight  # d/d(out - residual)
        grad_residual = (grad - grad_out_term).to(residual.dtype)
        grad_gate = _sigmoid_backward((grad * (out - residual)).to(weight.dtype), weight)
        return grad_residual, grad_gate, grad_out_term.to(out.dtype)


def query_key(gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) = silu(gate) * weight[i] + bias[i]; gate (..., z), weight and bias (2, z)."""
    return _QueryKey.apply(gate, weight, bias) if recomputing() else query_key_plain(gate, weight, bias)


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """residual + sigmoid(gate) * (out - residual)."""
    return _GatedResidual.apply(residual, gate, out) if recomputing() else gated_residual_plain(residual, gate, out)
