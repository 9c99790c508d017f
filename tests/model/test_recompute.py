"""The gate regions recomputed in backward (model/recompute.py): what they keep, and that recomputing changes no
value or gradient by a single bit against autograd of the same expressions."""

import contextlib

import pytest
import torch

from megatron_mega.model import gated_attention
from megatron_mega.model.gated_attention import MegaMovingAverageGatedAttention
from megatron_mega.model.recompute import recomputed
from tests.helpers import tiny_config


def _kept(fn):
    """Run fn() and return (its result, the tensors autograd packed for backward while it ran)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        return fn(), kept


def _kept_bytes(tensors, exclude=()) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def test_recomputed_keeps_only_its_inputs_and_gives_autograd_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    fn = lambda a, b: torch.addcmul(a, torch.sigmoid(b), torch.nn.functional.silu(a) - b)  # noqa: E731
    out, kept = _kept(lambda: recomputed(fn, x, y))
    assert sorted(t.data_ptr() for t in kept) == sorted([x.data_ptr(), y.data_ptr()])
    ref = fn(x, y)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, y), grad), torch.autograd.grad(ref, (x, y), grad)):
        assert torch.equal(a, b)
    with torch.no_grad():  # nothing to keep: the plain call
        assert torch.equal(recomputed(fn, x, y), ref)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunked", [False, True])
def test_gated_attention_recomputation_is_bit_identical_and_keeps_less(monkeypatch, autocast, chunked):
    config = tiny_config(decoder=True, dropout_prob=0.1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                         use_chunking=chunked, chunk_size=8, relative_positional_bias="rotary")
    torch.manual_seed(0)
    layer = MegaMovingAverageGatedAttention(config).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # not the init's zeros and ones: every gate and bias is exercised
    batch, length = 2, 24
    x = torch.randn(batch, length, config.hidden_size, requires_grad=True)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :5] = False  # left padding in one row

    def run():
        torch.manual_seed(1)  # the same dropout masks in both runs
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out, kept = _kept(lambda: layer(x, mask)[0])
        grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))
        return out, grads, _kept_bytes(kept, exclude=[x, *layer.parameters()])

    out, grads, kept = run()
    monkeypatch.setattr(gated_attention, "recomputed", lambda fn, *args: fn(*args))
    ref_out, ref_grads, ref_kept = run()
    assert torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    # no longer kept per token: sigmoid(residual gate) (d), silu of the query-key and attention gates (z + v) and the
    # float32 difference out - residual (d); newly kept: the dropped output the residual gate mixes in (d)
    d, z, v = config.hidden_size, config.shared_representation_size, config.intermediate_size
    half = 2 if autocast else 4
    assert ref_kept - kept == batch * length * (half * d + half * (z + v) + 4 * d - half * d)
