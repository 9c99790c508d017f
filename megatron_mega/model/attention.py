"""Single-head attention of MEGA over chunks: softmax, laplace or relu^2 scores with a relative bias.

Layout: queries are the last `L` positions of a key sequence of length `T = past + L` (past = keys cached from
earlier decoding steps in the current chunk). With chunking, the key sequence is cut into chunks of `chunk_size`
that attend only within themselves (Mega-chunk, linear in length); any length is accepted: the last chunk is padded
with masked keys. Without chunking the whole sequence is one chunk.

Masks agree across activations: a key is visible to a query when it is not padding and, for a decoder, not in the
query's future. softmax gives invisible keys zero weight; laplace/relu^2 multiply them by zero and normalise the
scores by the number of visible keys, so left padding, right padding and no padding give the same outputs on the
real tokens. Rows with no visible key give finite values (never NaN).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mega.model.activations import get_activation
from megatron_mega.model.dropout import apply_drop_mask, drop_mask
from megatron_mega.model.dropout import dropout as dropout_fn
from megatron_mega.model.recompute import product


def _masked_value(dtype: torch.dtype) -> float:
    # finite, so that a row with no visible key cannot produce NaN; a quarter of the range leaves room to add the
    # causal and the padding term together without overflowing to -inf.
    return torch.finfo(dtype).min / 4


def fused_softmax_attention(q: torch.Tensor) -> bool:
    """Whether softmax attention goes through SDPA. Yes on the CPU (its fused kernel takes the float mask); not on
    CUDA, where the kernels that take a float mask are slow at MEGA's value width (v=2048, beyond FlashAttention's
    256): 45k tokens/s against 79k for plain matmuls (H200, bf16, the 241M anchor at 4x4096 chunk 1024)."""
    return not q.is_cuda


def _no_dropout(weights: torch.Tensor) -> torch.Tensor:
    return weights


class ChunkedAttention(nn.Module):
    """Attention weights and their application to values. Holds no parameters: the relative bias belongs to the
    gated attention layer (transformers' state-dict layout) and is passed in."""

    replay_off_cuda = False  # see worth_recomputing

    def __init__(self, config, attention_dropout: float):
        super().__init__()
        self.chunk_size = config.chunk_size if config.use_chunking else None
        self.causal = bool(config.is_decoder)
        self.activation_name = config.attention_activation
        self.element_activation: Optional[Callable] = (
            None if config.attention_activation == "softmax" else get_activation(config.attention_activation))
        self.scaling = config.shared_representation_size ** -0.5
        self.attention_dropout = attention_dropout

    # ------------------------------------------------------------------ chunk layout
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask: Optional[torch.Tensor],
        relative_bias: nn.Module | torch.Tensor,
        output_attentions: bool = False,
        weight_drops: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """query (B, L, z); key (B, T, z); value (B, T, v); key_mask (B, T) bool, True = real token, or None.
        relative_bias: the module, or its (block x block) matrix for a pass without cache (`block_bias`).
        weight_drops: the attention dropout's mask, pre-drawn (`draw_weight_drops`), or None to draw it here.
        Returns (B, L, v) and, if asked, the weights (B, chunks, chunk queries, chunk keys)."""
        batch, length, _ = query.shape
        total = key.shape[1]
        past = total - length
        if self.chunk_size is None or total <= self.chunk_size:
            # one block; queries sit at positions past .. total-1 of it
            out, weights = self._attend(
                query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1),
                None if key_mask is None else key_mask.unsqueeze(1), relative_bias, query_offset=past,
                output_attentions=output_attentions, weight_drops=weight_drops)
            return out.squeeze(1), weights
        chunk = self.chunk_size
        tail = (-total) % chunk
        # queries are front-padded by the cached positions so that chunk boundaries fall where they did in the full
        # sequence; those dummy rows are dropped afterwards
        if past or tail:  # F.pad copies even when it adds nothing
            query = F.pad(query, (0, 0, past, tail))
        if tail:
            key = F.pad(key, (0, 0, 0, tail))
            value = F.pad(value, (0, 0, 0, tail))
            if key_mask is None:
                key_mask = torch.ones(batch, total, dtype=torch.bool, device=key.device)
            key_mask = F.pad(key_mask, (0, tail), value=False)
        chunks = (total + tail) // chunk
        out, weights = self._attend(
            query.reshape(batch, chunks, chunk, -1), key.reshape(batch, chunks, chunk, -1),
            value.reshape(batch, chunks, chunk, -1),
            None if key_mask is None else key_mask.view(batch, chunks, chunk), relative_bias, query_offset=0,
            output_attentions=output_attentions, weight_drops=weight_drops)
        out = out.reshape(batch, chunks * chunk, -1)[:, past:past + length]
        return out, weights

    # ------------------------------------------------------------------ a decoding step on fixed-size slots
    def attend_slots(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, filled: torch.Tensor,
                     slot: torch.Tensor, relative_bias: nn.Module) -> torch.Tensor:
        """One query at `slot` ((1,) int64, its position in the open chunk) against a static cache's slots: query
        (B, 1, z), key (B, S, z), value (B, S, v), filled (B, S) bool. Slots after `slot` hold an earlier chunk's
        keys (or nothing) and are masked with the padding: masked keys get exactly zero weight, so the output is
        the dynamic cache's over the visible keys alone. Returns (B, 1, v)."""
        positions = torch.arange(key.shape[1], device=key.device)
        visible = (filled & (positions <= slot)).unsqueeze(1)  # (B, 1, S): one block
        bias = relative_bias(slot, positions).to(query.dtype)  # (1, S)
        q, k, v = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if self.element_activation is None:
            out, _ = self._softmax(q, k, v, bias, None, visible, 0.0, _no_dropout, False)
        else:
            out, _ = self._element(q, k, v, bias, None, visible, None, _no_dropout)
        return out.squeeze(1)

    # ------------------------------------------------------------------ a pass without cache, its parts drawn ahead
    def worth_recomputing(self, device) -> bool:
        """Whether a training pass's attention is recomputed in backward (model/recompute.py) rather than keep its
        weights: on CUDA. On the CPU the replay's passes over the (C x C) weights cost more than the memory is worth
        (+10% of a step at the CPU benchmark's 4x1024 unchunked case, which then fell below its 3x target) and
        SDPA's fused kernel, which a pass without attention dropout takes there, keeps little anyway.
        `replay_off_cuda` forces it elsewhere: what tests and benchmarks/activation_memory.py count on the CPU."""
        return self.replay_off_cuda or torch.device(device).type == "cuda"

    def block_size(self, length: int) -> int:
        """The side of the square blocks a pass of `length` tokens without cache attends in."""
        return length if self.chunk_size is None or length <= self.chunk_size else self.chunk_size

    def block_bias(self, relative_bias: nn.Module, length: int, device) -> torch.Tensor:
        """The relative bias matrix a pass of `length` tokens without cache adds to every block's scores."""
        positions = torch.arange(self.block_size(length), device=device)
        return relative_bias(positions, positions)

    def draw_weight_drops(self, batch: int, length: int, device) -> Optional[torch.Tensor]:
        """The attention dropout's drops for a training pass of `length` tokens without cache (model/dropout.py's
        `drop_mask` over the weights' shape), drawn ahead so that a recomputation applies the same ones; None when
        it does not drop."""
        if not self.training or self.attention_dropout == 0.0:
            return None
        block = self.block_size(length)
        return drop_mask((batch, -(-length // block), block, block), self.attention_dropout, device)

    # ------------------------------------------------------------------ one block of chunks
    def _attend(self, q, k, v, key_mask, relative_bias, query_offset: int, output_attentions: bool,
                weight_drops: Optional[torch.Tensor] = None):
        """q (B, K, Cq, z); k (B, K, Ck, z); v (B, K, Ck, v); key_mask (B, K, Ck) or None."""
        n_query, n_key = q.shape[2], k.shape[2]
        device = q.device
        key_positions = torch.arange(n_key, device=device)
        query_positions = key_positions[query_offset:] if query_offset else torch.arange(n_query, device=device)
        if isinstance(relative_bias, torch.Tensor):
            bias = relative_bias.to(q.dtype)
        else:
            bias = relative_bias(query_positions, key_positions).to(q.dtype)  # (Cq, Ck)
        # a single query at the last key position (a decoding step) has no future keys: no mask to build or apply
        sees_all = n_query == 1 and query_offset == n_key - 1
        future = key_positions.view(1, -1) > query_positions.view(-1, 1) if self.causal and not sees_all else None
        dropout = self.attention_dropout if self.training else 0.0
        if weight_drops is not None:
            drop = lambda weights: apply_drop_mask(weights, weight_drops, dropout)  # noqa: E731
        else:
            drop = lambda weights: dropout_fn(weights, dropout, self.training)  # noqa: E731
        if self.element_activation is None:
            return self._softmax(q, k, v, bias, future, key_mask, dropout, drop, output_attentions)
        return self._element(q, k, v, bias, future, key_mask, query_positions, drop)

    def _softmax(self, q, k, v, bias, future, key_mask, dropout, drop, output_attentions):
        masked = _masked_value(q.dtype)
        scores_bias = bias if future is None else bias.masked_fill(future, masked)
        if key_mask is not None:
            padding = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, masked)
            scores_bias = scores_bias + padding.unsqueeze(2)
        # SDPA when it can: on the CPU its fused kernel takes the float mask, but it cannot drop weights, and with
        # dropout it falls back to a math path that draws a full mask with bernoulli_ (our dropout draws only the
        # drops) and runs a NaN-guarding softmax (isneginf/all/where passes) that the finite masked value here does
        # not need: training with attention dropout takes the explicit path below.
        if not output_attentions and fused_softmax_attention(q) and dropout == 0.0:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_bias, scale=self.scaling)
            return out, None
        lead, square = q.shape[:-2], scores_bias.shape[-2:]
        # one fused bias + scale * q k^T; a (Cq, Ck) bias broadcasts over the batch of chunks without a copy
        scores = torch.baddbmm(scores_bias if scores_bias.dim() == 2 else scores_bias.reshape(-1, *square),
                               q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]).transpose(-1, -2),
                               alpha=self.scaling)
        # softmax in the scores' dtype: under autocast that keeps the (chunks x C x C) weights in bfloat16, as SDPA
        # would (the kernel accumulates in float32 either way)
        weights = torch.softmax(scores, dim=-1, dtype=scores.dtype).view(*lead, *scores.shape[-2:])
        del scores
        out = product(drop(weights), v)
        return out, weights if output_attentions else None

    def _element(self, q, k, v, bias, future, key_mask, query_positions, drop):
        # the number of visible keys normalises the scores (MEGA's length scaling for laplace / relu^2)
        if future is not None:
            visible = ~future  # (Cq, Ck)
            if key_mask is not None:
                visible = visible & key_mask.unsqueeze(2)  # (B, K, Cq, Ck)
                lengths = visible.sum(-1, keepdim=True)
            else:
                lengths = (query_positions + 1).view(-1, 1)
        elif key_mask is not None:
            visible = key_mask.unsqueeze(2)  # (B, K, 1, Ck)
            lengths = key_mask.sum(-1, keepdim=True).unsqueeze(-1)
        else:
            visible = None
            lengths = torch.tensor(k.shape[2], device=q.device)
        lengths = lengths.clamp(min=1).to(q.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)) / lengths + bias
        weights = self.element_activation(scores)
        if visible is not None:
            weights = weights * visible.to(weights.dtype)
        out = product(drop(weights), v)
        return out, weights

