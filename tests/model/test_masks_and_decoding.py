"""Padding and causal masks agree; cached decoding equals the full forward pass; generate()."""

import itertools

import pytest
import torch

from megatron_mega import MegaForCausalLM, MegaForMaskedLM, MegaModel
from tests.helpers import decode_stepwise, tiny_config, token_ids

ACTIVATIONS = ["softmax", "laplace", "relu2"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_tokens(activation, decoder, side):
    """The same tokens padded on either side give the same hidden states as unpadded, never NaN."""
    model = MegaModel(tiny_config(attention_activation=activation, decoder=decoder)).eval()
    ids = token_ids(1, 9)
    pad = torch.full((1, 5), model.config.pad_token_id)
    padded = torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1)
    mask = (torch.arange(14) >= 5) if side == "left" else (torch.arange(14) < 9)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        out = model(padded, attention_mask=mask[None].long()).last_hidden_state
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, mask], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fully_padded_rows_stay_finite_and_do_not_leak(activation):
    """Left padding in a causal softmax model: pad queries see no key (transformers' defect 10 gives NaN)."""
    model = MegaModel(tiny_config(attention_activation=activation, decoder=True)).eval()
    ids = token_ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[1:]).last_hidden_state
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)


CASES = list(itertools.product(ACTIVATIONS, ["simple", "rotary"], [None, 4]))


@pytest.mark.parametrize("activation, bias, chunk", CASES)
def test_cached_decoding_equals_full_forward(activation, bias, chunk):
    config = tiny_config(attention_activation=activation, relative_positional_bias=bias, decoder=True,
                         use_chunking=chunk is not None, chunk_size=chunk or -1)
    model = MegaForCausalLM(config).eval()
    ids = token_ids(2, 15)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row: earlier pads must stay masked in every later step (defect 11)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for first in (1, 6):
            stepped, cache = decode_stepwise(model, ids, mask, first)
            real = mask.bool()
            torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-5)
    if chunk:  # the cache holds the open chunk only: 15 tokens, chunk 4 -> 3 positions
        assert cache[0].key.shape[1] == 15 % chunk
    else:
        assert cache[0].key.shape[1] == 15


def test_prefill_continuation_across_chunk_boundaries():
    """Several tokens at once on top of a cache, crossing chunk boundaries, equal the full pass."""
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=4)).eval()
    ids = token_ids(2, 17)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        for start, stop in [(5, 11), (11, 12), (12, 17)]:
            out = model(ids[:, start:stop], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_decode_step_cost_is_bounded_by_the_chunk():
    """After 200 tokens with chunk 8 a step attends to at most 8 keys: the cache never grows with context."""
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=8, max_positions=16)).eval()
    with torch.no_grad():
        out = model(token_ids(1, 5), use_cache=True)
        sizes = []
        for step in range(200):
            out = model(token_ids(1, 1, seed=step), past_key_values=out.past_key_values, use_cache=True)
            sizes.append(out.past_key_values[0].key.shape[1])
    assert max(sizes) <= 7 and out.past_key_values.seen_tokens == 205
    assert out.past_key_values[0].ema_state.shape == (1, 32, 4)


def test_generate_greedy_matches_uncached_and_stops_at_eos():
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=4)).eval()
    prompt = token_ids(3, 6)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt[0, :2] = model.config.pad_token_id
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=9)
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=9, use_cache=False)
    assert cached.shape == (3, 15)
    assert torch.equal(cached, uncached)
    # stop at eos: make the first generated token of every row eos
    eos = int(cached[0, 6])
    stopped = model.generate(prompt, attention_mask=mask, max_new_tokens=9, eos_token_id=eos)
    assert stopped.shape[1] <= 15
    row0 = stopped[0, 6:]
    assert row0[0] == eos and (row0[1:] == model.config.pad_token_id).all()


def test_generate_sampling_is_reproducible_and_respects_top_k():
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    prompt = token_ids(2, 4)
    a = model.generate(prompt, do_sample=True, max_new_tokens=8, top_k=3, temperature=0.7,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, do_sample=True, max_new_tokens=8, top_k=3, temperature=0.7,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # every sampled token is among the top 3 of its step
    with torch.no_grad():
        logits = model(a[:, :-1]).logits[:, 3:]
    top3 = logits.topk(3, -1).indices
    assert (top3 == a[:, 4:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_nucleus():
    from megatron_mega.model.generation import _top_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_top_p_filter(logits, 0.1))
    assert kept.tolist() == [[True, False, False, False]]


def test_encoder_refuses_a_cache():
    model = MegaForMaskedLM(tiny_config())
    with pytest.raises(ValueError, match="decoder"):
        model.mega(token_ids(1, 3), use_cache=True)
