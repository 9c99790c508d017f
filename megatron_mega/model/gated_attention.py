"""Moving average equipped gated attention (MEGA section 3): the EMA, the gates and single-head attention."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mega.model.activations import get_activation
from megatron_mega.model.attention import ChunkedAttention
from megatron_mega.model.cache import MegaLayerCache, MegaStaticLayerCache
from megatron_mega.model.dropout import MegaDropout
from megatron_mega.model.ema import MegaMultiDimensionDampedEma
from megatron_mega.model.gates import (gate_values_plain, gated_residual, gated_residual_plain, query_key,
                                       query_key_plain)
from megatron_mega.model.norms import MegaSequenceNorm
from megatron_mega.model.positional_bias import build_relative_positional_bias
from megatron_mega.model.precision import matmul_dtype
from megatron_mega.model.recompute import recomputed, recomputing
from megatron_mega.model.recomputed_linear import RecomputedInputLinear


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _concat_masks(past: Optional[torch.Tensor], past_len: int, new: Optional[torch.Tensor], new_len: int,
                  batch: int, device) -> Optional[torch.Tensor]:
    if past is None and new is None:
        return None
    if past is None:
        past = torch.ones(batch, past_len, dtype=torch.bool, device=device)
    if new is None:
        new = torch.ones(batch, new_len, dtype=torch.bool, device=device)
    return torch.cat([past, new], dim=1)


class MegaMovingAverageGatedAttention(nn.Module):
    """Names of submodules and parameters follow transformers so checkpoints map one to one. `recompute`: a
    training pass recomputes its attention and gated output in backward rather than keep their intermediates
    (model/block.py's `set_selective_recompute`)."""

    recompute = True

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.z_size = config.shared_representation_size
        self.v_size = config.intermediate_size
        self.chunk_size = config.chunk_size if config.use_chunking else None
        self.normalize_before = config.normalize_before_mega
        self.activation = get_activation(config.activation)
        self.dropout = MegaDropout(config.dropout_prob, is_featurewise=config.use_feature_dropout)
        self.hidden_dropout = MegaDropout(config.hidden_dropout_prob, is_featurewise=config.use_feature_dropout)
        self.norm = MegaSequenceNorm(config.normalization_type, config.hidden_size, affine=config.norm_affine)
        self.ema_gate = MegaMultiDimensionDampedEma(config)
        self.v_proj = RecomputedInputLinear(config.hidden_size, config.intermediate_size)
        self.mx_proj = RecomputedInputLinear(config.hidden_size, self.z_size + self.v_size + 2 * config.hidden_size)
        self.h_proj = RecomputedInputLinear(config.intermediate_size, config.hidden_size)
        self.qk_weight = nn.Parameter(torch.empty(2, self.z_size))
        self.qk_bias = nn.Parameter(torch.empty(2, self.z_size))
        self.rel_pos_bias = build_relative_positional_bias(config)
        self.attention = ChunkedAttention(config, config.attention_probs_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[MegaLayerCache] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[MegaLayerCache], Optional[torch.Tensor]]:
        """x: (B, L, D); mask: (B, L) bool, True = real token, or None. Returns the output (B, L, D), the
        layer's new cache when `use_cache`, and attention weights when asked."""
        batch, length, _ = x.shape
        residual = x
        h = self.norm(x) if self.normalize_before else x
        # (B, L, v), activated and dropped below; under autocast v_proj keeps h (kept anyway: the EMA's input), not
        # its bfloat16 copy
        value = self.v_proj(h, prologue=_same)
        # a training pass recomputes parts in backward (model/recompute.py, model/recomputed_linear.py): the
        # activated, dropped tensors, the attention's scores and weights are not kept, only what they come from;
        # dropout masks are drawn ahead for that
        regions = (self.recompute and cache is None and not use_cache and not output_attentions
                   and recomputing())
        recompute_output = regions and self.dropout.maskable
        recompute_attention = (regions and self.hidden_dropout.maskable and self.attention.attention_dropout < 1.0
                               and self.attention.worth_recomputing(x.device))
        if recompute_attention:
            value_drops = self.hidden_dropout.mask_for(value)
        else:
            value = self.hidden_dropout(self.activation(value))
        ema_out, ema_state = self.ema_gate(
            h, mask, state=None if cache is None else cache.ema_state, return_state=use_cache, activate=False)
        # the EMA computes in float32; mx_proj reads its output in the matmul dtype, so under autocast the cast comes
        # first and the silu and dropout between them (and their backward) run on half the bytes
        ema_out = ema_out.to(matmul_dtype(ema_out))
        if recompute_output:
            # mx_proj keeps the EMA's output before its silu and the drops, not the activated, dropped copy it reads
            base = self.mx_proj(ema_out, self.dropout.mask_for(ema_out), prologue=self._activate_and_drop_ema)
        else:
            base = self.mx_proj(self.dropout(F.silu(ema_out)))
        # the gates stay pre-activation here: each is activated where it is used, by a function that keeps only
        # `base` (kept anyway) for backward, not the activated copy (model/gates.py)
        residual_gate, query_key_gate, attention_gate, intermediate = torch.split(
            base, [self.hidden_size, self.z_size, self.v_size, self.hidden_size], dim=-1)
        if recompute_attention:
            bias = self.attention.block_bias(self.rel_pos_bias, length, x.device)
            weight_drops = self.attention.draw_weight_drops(batch, length, x.device)
            attended = recomputed(self._attend, query_key_gate, self.qk_weight, self.qk_bias, value, value_drops,
                                  mask, bias, weight_drops)
            weights = new_cache = None
        else:
            query, key = query_key(query_key_gate, self.qk_weight, self.qk_bias)
            attended, weights, new_cache = self._attend_with_cache(
                query, key, value, mask, cache, use_cache, output_attentions, ema_state)

        # h_proj keeps the attention output and the gate for backward, not their product it reads
        out = intermediate + self.h_proj(attended, attention_gate, prologue=gate_values_plain)
        if recompute_output:
            # the activated, dropped output the residual gate mixes in is recomputed too
            out = recomputed(self._gated_output, residual, residual_gate, out, self.dropout.mask_for(out))
        else:
            out = gated_residual(residual, residual_gate, self.dropout(self.activation(out)))
        if not self.normalize_before:
            out = self.norm(out)
        return out, new_cache, weights

    def _attend(self, query_key_gate, qk_weight, qk_bias, value, value_drops, mask, bias,
                weight_drops) -> torch.Tensor:
        """The attention of a training pass, from what is kept anyway (the mx_proj output, the v_proj output)."""
        query, key = query_key_plain(query_key_gate, qk_weight, qk_bias)
        value = self.hidden_dropout.apply_mask(self.activation(value), value_drops)
        return self.attention(query, key, value, mask, bias, weight_drops=weight_drops)[0]

    def _activate_and_drop_ema(self, ema_out, drops) -> torch.Tensor:
        return self.dropout.apply_mask(F.silu(ema_out), drops)

    def _gated_output(self, residual, residual_gate, out, drops) -> torch.Tensor:
        return gated_residual_plain(residual, residual_gate, self.dropout.apply_mask(self.activation(out), drops))

    def _attend_with_cache(self, query, key, value, mask, cache, use_cache, output_attentions, ema_state):
        if isinstance(cache, MegaStaticLayerCache):
            return self._attend_static(query, key, value, mask, cache, ema_state)
        batch, length = query.shape[:2]
        key_mask = mask
        if cache is not None:
            past = cache.key.shape[1]
            key = torch.cat([cache.key, key], dim=1)
            value = torch.cat([cache.value, value], dim=1)
            key_mask = _concat_masks(cache.key_mask, past, mask, length, batch, query.device)
        attended, weights = self.attention(query, key, value, key_mask, self.rel_pos_bias, output_attentions)
        new_cache = self._next_cache(key, value, key_mask, ema_state) if use_cache else None
        return attended, weights, new_cache

    def _attend_static(self, query, key, value, mask, cache: MegaStaticLayerCache, ema_state):
        """One decoding step on a static cache: the new key, value and EMA state are written into its buffers in
        place, and the query attends to all of its slots, those not visible masked (ChunkedAttention.attend_slots).
        No shape depends on the position and nothing is read back to the host: a CUDA graph can replay it. What it
        cannot do (several tokens, autograd, dropout) MegaStaticCache.check_step refuses first."""
        slot = cache.position.remainder(cache.size).view(1)
        cache.key.index_copy_(1, slot, key.to(cache.key.dtype))
        cache.value.index_copy_(1, slot, value.to(cache.value.dtype))
        if mask is None:
            cache.filled.index_fill_(1, slot, True)
        else:
            cache.filled.index_copy_(1, slot, mask)
        cache.ema_state.copy_(ema_state)
        attended = self.attention.attend_slots(query, cache.key, cache.value, cache.filled, slot, self.rel_pos_bias)
        return attended, None, cache

    def _next_cache(self, key, value, key_mask, ema_state) -> MegaLayerCache:
        if self.chunk_size is not None:
            # keep only the positions of the chunk still open; a full chunk is never attended to again
            keep = key.shape[1] % self.chunk_size
            start = key.shape[1] - keep
            key, value = key[:, start:], value[:, start:]
            key_mask = None if key_mask is None else key_mask[:, start:]
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        return MegaLayerCache(key, value, key_mask, ema_state)
