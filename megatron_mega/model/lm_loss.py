"""Cross-entropy of a linear LM head without materialising the (tokens x vocab) logits.

The loss is computed over row chunks; each chunk's logits live only while its loss and gradients are computed, so
the memory of the head is one chunk of logits instead of logits + log-softmax + their gradients (at 4 x 4096 tokens
and a 32000-word vocabulary that is ~150 MB instead of ~8 GB). The gradients are computed in the forward pass (the
chunk's softmax is at hand there) and scaled by the incoming gradient in the backward pass.

Only rows that have a target are passed in: for masked LM that is ~15% of the tokens, and the head's cost shrinks
with them.

Two ways through a chunk of rows:
- the CPU's in float32/float64: vocabulary blocks of ~2M logits, each worked on while it is in cache
  (`_chunk_loss_and_grads`);
- an accelerator's, and half-precision products' (autocast, bf16 weights) on any device: the whole vocabulary at
  once (`_whole_vocabulary`), in as few passes over the logits as eager PyTorch allows: one fused log-softmax for
  the loss, one fused softmax for the gradient, both read by matrix multiplies in the matmul dtype. Under autocast
  the weight is cast once per call, not once per block of every chunk. Estimated on an H200
  (benchmarks/gpu_cost_model.py, 4 x 4096 tokens, vocabulary 32000): the CPU's way there costs ~20 ms a step more
  than a GPT's plain logits + cross-entropy, mostly the weight's casts (16 GiB moved per step) and ~2,000 small
  kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mega.model.precision import matmul_dtype

# ~32M logits per chunk: 128 MB in float32, large enough to keep the matrix multiplies efficient
_CHUNK_ELEMENTS = 1 << 25
# ~2M logits per vocabulary block (8 MB in float32): a block's exp and its first matrix multiply run in cache
_BLOCK_ELEMENTS = 1 << 21
# an accelerator's chunk, the whole vocabulary wide: ~64M logits (256 MB of float32 log-probabilities while the
# chunk's loss is taken), few chunks, so the (vocab x H) gradient of the weight is added up few times
_WIDE_CHUNK_ELEMENTS = 1 << 26


def whole_vocabulary(device: torch.device) -> bool:
    """Whether chunks take the whole vocabulary at once (`_whole_vocabulary`): off the CPU."""
    return device.type != "cpu"


def _whole_vocabulary(h_mm, w_mm, b_mm, targets, acc, want_hidden: bool, want_params: bool):
    """`_chunk_loss_and_grads` for one block spanning the vocabulary; h_mm, w_mm, b_mm: the rows, weight and bias in
    the matmul dtype. Returns the summed loss and, as asked, the gradients of the summed loss for the rows, the
    weight and the bias ((softmax - onehot) @ W, (softmax - onehot)^T @ h, summed over rows), still to be divided by
    the row count."""
    logits = torch.nn.functional.linear(h_mm, w_mm, b_mm)  # (n, vocab)
    target_log_probs = torch.log_softmax(logits, dim=1, dtype=acc).gather(1, targets.unsqueeze(1))  # (n, 1)
    loss_sum = -target_log_probs.sum()
    grad_h = part_weight = part_bias = None
    if want_hidden or want_params:
        # softmax - onehot in the matmul dtype, as autocast's backward feeds the matmuls; the target entries,
        # p - 1, from the float32 log-probabilities: rounding p first would cancel a confident prediction's
        # gradient (p = 0.9998 is 1.0 in bfloat16)
        grad = torch.softmax(logits, dim=1)
        del logits
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] = torch.expm1(target_log_probs.squeeze(1)).to(grad.dtype)
        if want_hidden:
            grad_h = (grad @ w_mm).to(acc)
        if want_params:
            part_weight = grad.t() @ h_mm
            part_bias = grad.sum(dim=0, dtype=acc) if b_mm is not None else None
    return loss_sum, grad_h, part_weight, part_bias


def _chunk_loss_and_grads(h, weight, bias, targets, denom: int, acc, want_hidden: bool, want_params: bool):
    """Summed loss of rows h (n, H) and, as asked, d(loss / denom) for h, and the per-block pieces of the weight and
    bias gradients, computed block by block over the vocabulary.

    The softmax is never normalised in a separate pass over the (n x vocab) logits: block j keeps
    e_j = exp(logits_j - max_j) (computed in place, while the block is in cache) and the row factor
    f_j = exp(max_j - lse) / denom turns it into the gradient, softmax_j / denom = f_j * e_j. The factors are
    applied to the small operands instead: d h = sum_j f_j * (e_j @ W_j), d W_j = e_j^T @ (f_j * h),
    d b_j = e_j^T @ f_j, and the one-hot part of (softmax - onehot) is subtracted at the target rows only.
    Memory traffic over the logits: one write and one read, instead of some eight passes."""
    n, vocab = h.shape[0], weight.shape[0]
    cols = max(1, _BLOCK_ELEMENTS // n)
    peaks, sums, hidden_parts, exps = [], [], [], []
    for v0 in range(0, vocab, cols):
        w = weight[v0:v0 + cols]
        logits = torch.nn.functional.linear(h, w, None if bias is None else bias[v0:v0 + cols]).to(acc)
        peak = logits.amax(dim=1, keepdim=True)
        e = logits.sub_(peak).exp_()
        peaks.append(peak)
        sums.append(e.sum(dim=1, keepdim=True))
        if want_hidden:
            hidden_parts.append(e @ w.to(acc))
        if want_params:
            exps.append((v0, e))
    peaks, sums = torch.cat(peaks, dim=1), torch.cat(sums, dim=1)  # (n, blocks)
    peak = peaks.amax(dim=1, keepdim=True)
    lse = peak + torch.log((sums * torch.exp(peaks - peak)).sum(dim=1, keepdim=True))  # (n, 1)
    h_acc = h.to(acc)
    target_rows = weight[targets].to(acc)
    target_logits = (h_acc * target_rows).sum(dim=1)
    if bias is not None:
        target_logits = target_logits + bias[targets].to(acc)
    loss_sum = (lse.squeeze(1) - target_logits).sum()
    factors = torch.exp(peaks - lse).div_(denom)  # (n, blocks)
    grad_h = None
    if want_hidden:
        grad_h = target_rows.mul_(-1.0 / denom)
        for j, part in enumerate(hidden_parts):
            grad_h.addcmul_(part, factors[:, j:j + 1])
    weight_parts = []
    for j, (v0, e) in enumerate(exps):
        weight_parts.append((v0, e.t() @ (h_acc * factors[:, j:j + 1]), e.t() @ factors[:, j]))
    return loss_sum, grad_h, weight_parts


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        # half precision inputs accumulate in float32; float64 stays float64
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # half-precision products take the whole vocabulary on every device: the blocks' factored gradient (below)
        # subtracts the one-hot from products rounded to half precision, which loses a confident prediction's
        # gradient, and their target logits would not be those the log-sum-exp was taken over
        mm_dtype = matmul_dtype(hidden, weight)
        whole = whole_vocabulary(hidden.device) or mm_dtype in (torch.float16, torch.bfloat16)
        chunk = max(1, (_WIDE_CHUNK_ELEMENTS if whole else _CHUNK_ELEMENTS) // weight.shape[0])
        needs = ctx.needs_input_grad
        want_hidden, want_weight, want_bias = needs[0], needs[1], bias is not None and needs[2]
        # in the accumulator's precision until backward has scaled it: divided by the row count here and
        # multiplied by fp16's loss scale only there, the rows' gradients (~1e-6) would fall below float16's
        # normal range (6e-5) and lose digits or vanish in between
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        grad_bias = torch.empty(bias.shape, dtype=acc, device=bias.device) if want_bias else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        if whole:
            # the matmul operands cast once for all chunks, as autocast would cast them for F.linear; then autocast is
            # off, so that it does not cast them again, nor the gradient of the logits, at every product
            h_mm, w_mm = hidden.to(mm_dtype), weight.to(mm_dtype)
            b_mm = None if bias is None else bias.to(mm_dtype)
            autocast_off = torch.autocast(hidden.device.type, enabled=False)
        for start in range(0, rows, chunk):
            t = targets[start:start + chunk]
            if whole:
                with autocast_off:
                    loss_sum, grad_h, part_weight, part_bias = _whole_vocabulary(
                        h_mm[start:start + chunk], w_mm, b_mm, t, acc, want_hidden, want_weight or want_bias)
                # the gradients are not yet divided by the row count: that scale is applied where they are added
                weight_parts, scale = [(0, part_weight, part_bias)], 1.0 / rows
                if grad_h is not None:
                    grad_h = grad_h.mul_(scale)
            else:
                loss_sum, grad_h, weight_parts = _chunk_loss_and_grads(
                    hidden[start:start + chunk], weight, bias, t, rows, acc, want_hidden, want_weight or want_bias)
                scale = 1.0
            total += loss_sum
            if grad_h is not None:
                grad_hidden[start:start + chunk] = grad_h
            first = start == 0
            for v0, part_weight, part_bias in weight_parts:
                # the first row chunk writes each block, later ones add to it: no zero-filled (vocab x H) start;
                # scaled in the accumulator's precision, not in the (maybe bfloat16) part's
                for grad, part in ((grad_weight, part_weight), (grad_bias, part_bias)):
                    if grad is None:
                        continue
                    block = grad[v0:v0 + part.shape[0]]
                    if first:
                        block.copy_(part)
                        if scale != 1.0:
                            block.mul_(scale)
                    else:
                        block.add_(part, alpha=scale)
            if whole:
                continue  # its parts hold the one-hot term already
            # the one-hot part of (softmax - onehot) / rows, at the target rows only
            if grad_weight is not None:
                grad_weight.index_add_(0, t, hidden[start:start + chunk].to(acc), alpha=-1.0 / rows)
            if grad_bias is not None:
                grad_bias.index_add_(0, t, torch.full(t.shape, -1.0 / rows, dtype=acc, device=t.device))
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        # the loss is usually the root of the graph (grad_output == 1): skip multiplying a (vocab x hidden) gradient.
        # Checked on CPU only, where reading the value costs no device synchronisation.
        unit = grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0
        scale = None if unit else grad_output
        grad_hidden = _scaled(next(saved), scale).to(ctx.dtypes[0]) if ctx.has[0] else None
        grad_weight = _scaled(next(saved), scale).to(ctx.dtypes[1]) if ctx.has[1] else None
        grad_bias = _scaled(next(saved), scale).to(ctx.dtypes[2]) if ctx.has[2] else None
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


def lm_head_loss(hidden: torch.Tensor, labels: torch.Tensor, transform, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """The LM heads' loss (the plain model's and the pipeline's last stage): `transform` (the optional dense+tanh)
    and the output projection applied to the labelled rows only, fused with the cross-entropy."""
    rows, targets = labelled_rows(hidden, labels, ignore_index)
    return linear_cross_entropy(transform(rows), weight, bias, targets)


class LMHeadTransform:
    """Mixin for the modules that own an LM head (the causal/masked LM models and the pipeline's last stage):
    transformers' optional dense+tanh before the output projection, as attributes `dense` and `hidden_activation`
    of the owner, so the state-dict names are the owner's (`dense.weight`)."""

    def init_lm_transform(self, config) -> None:
        if config.add_lm_hidden_dense_layer:
            self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)
            self.hidden_activation = torch.nn.Tanh()
        else:
            self.dense = None
            self.hidden_activation = None

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hidden_activation(self.dense(hidden)) if self.dense is not None else hidden
