"""Decoding on a static cache (fixed-size buffers, model/cache.py MegaStaticCache): the dynamic cache's numbers, and a
step a CUDA graph can capture (fixed shapes and memory, nothing read back to the host, no host data copied in)."""

import itertools
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mega import MegaForCausalLM
from megatron_mega.model.cache import MegaStaticCache
from tests.helpers import tiny_config, token_ids

ACTIVATIONS = ["softmax", "laplace", "relu2"]


def _model(activation="softmax", bias="simple", chunk=4, dtype=torch.float64):
    config = tiny_config(attention_activation=activation, relative_positional_bias=bias, decoder=True,
                         use_chunking=chunk is not None, chunk_size=chunk or -1)
    torch.manual_seed(0)
    return MegaForCausalLM(config).eval().to(dtype)


@pytest.mark.parametrize("activation, bias, chunk", list(itertools.product(ACTIVATIONS, ["simple", "rotary"],
                                                                              [None, 4])))
def test_static_steps_equal_the_full_forward(activation, bias, chunk):
    """Prefill 5 tokens (a left-padded row among them), then 10 steps on the static cache, across two chunk
    boundaries: the logits of the full forward to float64 rounding."""
    model = _model(activation, bias, chunk)
    ids = token_ids(2, 15)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        cache = MegaStaticCache.from_cache(out.past_key_values, chunk or 15)
        logits = [out.logits]
        for t in range(5, 15):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            logits.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[real], full[real], rtol=1e-12, atol=1e-12)
    assert cache.seen_tokens == 15 and int(cache.position) == 15


@pytest.mark.parametrize("chunk", [None, 3])
def test_generate_with_a_static_cache_gives_the_dynamic_tokens(chunk):
    model = _model(chunk=chunk, dtype=torch.float32)
    prompt = token_ids(3, 6)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    prompt[0, :2] = model.config.pad_token_id
    dynamic = model.generate(prompt, attention_mask=mask, max_new_tokens=11)
    static = model.generate(prompt, attention_mask=mask, max_new_tokens=11, cache_implementation="static")
    assert torch.equal(static, dynamic)
    eos = int(dynamic[1, 8])  # a row that finishes early keeps being fed pads, as with the dynamic cache
    stopped = [model.generate(prompt, attention_mask=mask, max_new_tokens=11, eos_token_id=eos,
                              cache_implementation=kind) for kind in ("dynamic", "static")]
    assert torch.equal(stopped[0], stopped[1])
    sampled = [model.generate(prompt, attention_mask=mask, max_new_tokens=11, do_sample=True, top_k=5,
                              generator=torch.Generator().manual_seed(3), cache_implementation=kind)
               for kind in ("dynamic", "static")]
    assert torch.equal(sampled[0], sampled[1])


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.copies_to_device = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func)] += 1
        if func is torch.ops.aten._to_copy.default and "device" in kwargs:
            self.copies_to_device += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("activation", ["softmax", "laplace"])
def test_a_static_step_can_be_captured_as_a_cuda_graph(activation):
    """What capture needs, checked on the CPU: no operation reads a value back to the host (.item(), bool(), a
    nonzero), none makes a tensor from host data or moves one between devices, and every step reads and writes the
    same buffers at the same shapes, in the middle of a chunk and across its end."""
    model = _model(activation, "rotary", chunk=4, dtype=torch.float32)
    ids = token_ids(1, 12)
    with torch.no_grad():
        out = model(ids[:, :2], use_cache=True)
        cache = MegaStaticCache.from_cache(out.past_key_values, 4)
        buffers = [(t.data_ptr(), t.shape) for t in cache._buffers()]
        model(ids[:, 2:3], past_key_values=cache)  # memoises the coefficients and tables, as a warm-up does
        for t in range(3, 12):
            with _Ops() as recorded:
                model(ids[:, t:t + 1], past_key_values=cache)
            host = [op for op in recorded.ops if any(word in op for word in (
                "_local_scalar_dense", "lift_fresh", "is_nonzero", "nonzero", "masked_select", "item"))]
            assert host == [] and recorded.copies_to_device == 0, (t, host)
            assert [(b.data_ptr(), b.shape) for b in cache._buffers()] == buffers


def test_static_cache_refusals():
    """What a static step cannot do is refused before any buffer is written, with the fix in the message."""
    model = _model(chunk=None, dtype=torch.float32)
    ids = token_ids(1, 8)
    with torch.no_grad():
        prefill = model(ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="does not fit"):
            MegaStaticCache.from_cache(prefill, 3)
        cache = MegaStaticCache.from_cache(prefill, 5)
        before = cache.snapshot()
        for kwargs, message in [
                (dict(input_ids=ids[:, 4:6]), "one token per step"),
                (dict(input_ids=ids[:, 4:5], use_cache=False), "use_cache=False"),
                (dict(input_ids=ids[:, 4:5], output_attentions=True), "attention weights")]:
            with pytest.raises(ValueError, match=message):
                model(past_key_values=cache, **kwargs)
        model.train()
        with pytest.raises(ValueError, match="model.eval"):
            model(ids[:, 4:5], past_key_values=cache)
        model.eval()
    with pytest.raises(ValueError, match="torch.no_grad"):  # backward would read the state overwritten in place
        model(ids[:, 4:5], past_key_values=cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.snapshot(), before)) and cache.seen_tokens == 4
    with torch.no_grad():
        model(ids[:, 4:5], past_key_values=cache)
        with pytest.raises(ValueError, match="has room for 5 positions"):
            model(ids[:, 5:6], past_key_values=cache)
    chunked = _model(chunk=4, dtype=torch.float32)
    with torch.no_grad():
        # fewer slots than the chunk would cut its attention short, more would let it reach across chunks
        cache = MegaStaticCache.from_cache(chunked(ids[:, :1], use_cache=True).past_key_values, 8)
        with pytest.raises(ValueError, match="chunk_size = 4"):
            chunked(ids[:, 1:2], past_key_values=cache)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, max_new_tokens=2, cache_implementation="paged")
    with pytest.raises(ValueError, match="needs cache_implementation='static'"):
        model.generate(ids, max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", cuda_graph=True)
