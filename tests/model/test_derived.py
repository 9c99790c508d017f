"""Decoding memoises the EMA coefficients and the rotary tables (model/derived.py): the same numbers as computing
them, never a stale value after the parameters change, and nothing memoised outside a cached forward without
autograd."""

from __future__ import annotations

import torch

from megatron_mega import MegaForCausalLM
from megatron_mega.model.derived import memoising, memoising_active
from megatron_mega.model.positional_bias import MegaRotaryRelativePositionalBias
from tests.helpers import decode_stepwise, tiny_config, token_ids
from tests.reference.perturb import perturb_weights


def _model(seed: int) -> MegaForCausalLM:
    torch.manual_seed(seed)
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=8,
                                        relative_positional_bias="rotary")).eval()
    perturb_weights(model, seed, scale=0.05)
    return model


def test_memoised_rotary_bias_is_the_computed_one_bit_for_bit():
    bias = MegaRotaryRelativePositionalBias(tiny_config(relative_positional_bias="rotary"))
    torch.nn.init.normal_(bias.alpha)
    torch.nn.init.normal_(bias.b_param)
    keys = torch.arange(13)
    for queries in (keys[12:], keys[5:], torch.arange(13)):
        with torch.no_grad():
            plain = bias(queries, keys)
            with memoising():
                assert memoising_active()
                memo = bias(queries, keys)
        assert torch.equal(memo, plain)


def test_changed_parameters_are_not_served_stale_values():
    ids = token_ids(2, 21)
    model, other = _model(0), _model(1)
    decode_stepwise(model, ids, first=3)  # fills the memos with model's values
    model.load_state_dict(other.state_dict())
    got, _ = decode_stepwise(model, ids, first=3)
    expected, _ = decode_stepwise(other, ids, first=3)
    assert torch.equal(got, expected)
    with torch.no_grad():
        model.mega.layers[0].mega_layer.ema_gate.damping_factor.add_(0.5)  # an in-place change, as an optimizer's
        model.mega.layers[0].mega_layer.rel_pos_bias.alpha.mul_(2.0)
        full = model(ids).logits
    stepwise, _ = decode_stepwise(model, ids, first=3)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-6)


def test_nothing_is_memoised_with_autograd_on_or_outside_decoding():
    with memoising():
        assert not memoising_active()  # autograd on
    with torch.no_grad():
        assert not memoising_active()  # no cached forward
    model = _model(0)
    ema = model.mega.layers[0].mega_layer.ema_gate
    ids = token_ids(1, 9)
    with torch.no_grad():
        model(ids, use_cache=False)
    assert ema._derived._key is None
    model(ids, use_cache=True).logits.sum().backward()  # a cached forward with autograd: gradients, no memo
    assert ema._derived._key is None and ema.damping_factor.grad is not None


def test_writes_the_version_counter_misses_are_seen_by_the_next_sequence():
    """DeepSpeed's ZeRO-1/2 and bf16 optimizers write new weights through flat buffers that `p.data` views, which
    leaves `p._version` unchanged: the next sequence (a forward from an empty cache) must not read the old memo.
    Evaluation under those optimizers read the weights of its first run ever after."""
    ids = token_ids(2, 21)
    model, other = _model(0), _model(1)
    decode_stepwise(model, ids, first=3)
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), other.parameters()):
            version = mine._version
            mine.data.copy_(theirs)
            assert mine._version == version  # invisible to the version counter
    got, _ = decode_stepwise(model, ids, first=3)
    expected, _ = decode_stepwise(other, ids, first=3)
    assert torch.equal(got, expected)


def test_the_training_loss_builds_no_cache():
    """The trainer's loss module runs the decoder without a cache (its config defaults use_cache on): no cache to
    hold in evaluation and nothing memoised, so weights written behind autograd's back are always read fresh."""
    from megatron_mega.training.trainer import LMLoss

    model = _model(0)
    loss = LMLoss(model, "causal").eval()
    ids = token_ids(2, 12)
    with torch.no_grad():
        before = loss(ids[:, :-1], ids[:, 1:])
        for p in model.parameters():
            p.data.add_(0.01)
        after = loss(ids[:, :-1], ids[:, 1:])
        fresh = LMLoss(model, "causal").eval()(ids[:, :-1], ids[:, 1:])
    ema = model.mega.layers[0].mega_layer.ema_gate
    assert ema._derived._key is None and not torch.equal(before, after) and torch.equal(after, fresh)
