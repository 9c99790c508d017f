"""Cross-entropy of a linear LM head without materialising the (tokens x vocab) logits.

The loss is computed over row chunks; each chunk's logits live only while its loss and gradients are computed, so
the memory of the head is one chunk of logits instead of logits + log-softmax + their gradients (at 4 x 4096 tokens
and a 32000-word vocabulary that is ~150 MB instead of ~8 GB). The gradients are computed in the forward pass (the
chunk's softmax is at hand there) and scaled by the incoming gradient in the backward pass.

Only rows that have a target are passed in: for masked LM that is ~15% of the tokens, and the head's cost shrinks
with them.
"""

from __future__ import annotations

from typing import Optional

import torch

# ~32M logits per chunk: 128 MB in float32, large enough to keep the matrix multiplies efficient
_CHUNK_ELEMENTS = 1 << 25


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        # half precision inputs accumulate in float32; float64 stays float64
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        needs = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        grad_bias = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                     if bias is not None and needs[2] else None)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(mean loss)/d logits = (softmax - onehot) / rows
            probs = torch.exp(logits.sub_(lse[:, None]))
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            probs /= rows
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.t() @ h.to(acc)
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grad_hidden = next(saved) * grad_output if ctx.has[0] else None
        grad_weight = (next(saved) * grad_output).to(ctx.dtypes[0]) if ctx.has[1] else None
        grad_bias = (next(saved) * grad_output).to(ctx.dtypes[1]) if ctx.has[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of hidden (..., D) whose label is not `ignore_index`, and those labels: (M, D), (M,)."""
    labels = labels.reshape(-1).to(hidden.device)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), labels.index_select(0, rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` (M, V) against `targets` (M,), every row counted.

    Equals F.cross_entropy(F.linear(hidden, weight, bias), targets), NaN when M == 0 as there."""
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum() * 0.0) / 0.0
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
