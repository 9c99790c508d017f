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
        # the (vocab x hidden) gradients start as the first chunk's product rather than as zeros plus it: one pass
        # over a 32 MB tensor less per step, as all rows usually fit in one chunk
        want_weight, want_bias = needs[1], bias is not None and needs[2]
        grad_weight = grad_bias = None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = torch.nn.functional.linear(h, weight, bias).to(acc)
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp by hand, in place, so that exp(logits - max) is computed once and becomes the softmax:
            # torch.logsumexp followed by exp(logits - lse) walks the (rows x vocab) chunk twice as often and
            # allocates another one
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            total += (peak + torch.log(sums)).sum() - target_logits.sum()
            if grad_hidden is None and not want_weight and not want_bias:
                continue
            # d(mean loss)/d logits = (softmax - onehot) / rows
            probs.mul_(sums.reciprocal_().div_(rows))
            probs[torch.arange(len(t), device=t.device), t] -= 1.0 / rows
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                part = probs.t() @ h.to(acc)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
            if want_bias:
                part = probs.sum(0)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        # the loss is usually the root of the graph (grad_output == 1): skip multiplying a (vocab x hidden) gradient.
        # Checked on CPU only, where reading the value costs no device synchronisation.
        unit = grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0
        scale = None if unit else grad_output
        grad_hidden = _scaled(next(saved), scale) if ctx.has[0] else None
        grad_weight = _scaled(next(saved), scale).to(ctx.dtypes[0]) if ctx.has[1] else None
        grad_bias = _scaled(next(saved), scale).to(ctx.dtypes[1]) if ctx.has[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def _scaled(grad: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return grad if scale is None else grad * scale


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
