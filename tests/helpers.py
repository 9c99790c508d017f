"""Tiny MEGA configs and seeded inputs shared by the tests."""

from __future__ import annotations

import torch

from megatron_mega import MegaConfig

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, intermediate_size=48, ema_projection_size=4,
            shared_representation_size=16, nffn_hidden_size=40, max_positions=64, dropout_prob=0.0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)


def tiny_config(**overrides) -> MegaConfig:
    """A tiny config; `decoder=True` is shorthand for is_decoder=True, bidirectional=False."""
    decoder = overrides.pop("decoder", False)
    if decoder:
        overrides.setdefault("is_decoder", True)
        overrides.setdefault("bidirectional", False)
    return MegaConfig(**{**TINY, **overrides})


def token_ids(batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 0) -> torch.Tensor:
    """Ids >= 3 (never bos/pad/eos), so unmasked positions are never the zero pad embedding."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)



def decode_stepwise(model, ids: torch.Tensor, mask: torch.Tensor | None = None, first: int = 1):
    """Logits of a prefill of `first` tokens followed by one cached step per token, and the final cache."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model(ids[:, :first], attention_mask=mask[:, :first], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(first, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    return torch.cat(logits, 1), cache


def kept_for_backward(fn):
    """Run fn() and return (its result, the tensors autograd packed for backward while it ran)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        return fn(), kept


def kept_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages among `tensors`, those of `exclude` left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in storages.items() if ptr not in skip)
