"""MEGA's gates as functions that recompute their activations in backward (model/gates.py): what they keep, and
that each gives the values and gradients of autograd of its plain expression, to the bit."""

import contextlib

import pytest
import torch

from megatron_mega.model import gated_attention
from megatron_mega.model.gated_attention import MegaMovingAverageGatedAttention
from megatron_mega.model import gates
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


GATES = {
    "query_key": (gates.query_key, gates.query_key_plain, lambda dt: (
        torch.randn(2, 5, 6, dtype=dt), torch.randn(2, 6), torch.randn(2, 6))),
    "gate_values": (gates.gate_values, gates.gate_values_plain, lambda dt: (
        torch.randn(2, 5, 6, dtype=dt), torch.randn(2, 5, 6, dtype=dt))),
    "gated_residual": (gates.gated_residual, gates.gated_residual_plain, lambda dt: (
        torch.randn(2, 5, 6), torch.randn(2, 5, 6, dtype=dt), torch.randn(2, 5, 6, dtype=dt))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(GATES))
def test_gate_keeps_only_its_inputs_and_gives_autograd_gradients(name, dtype):
    fn, plain, make = GATES[name]
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in make(dtype)]
    out, kept = _kept(lambda: fn(*inputs))
    assert {t.untyped_storage().data_ptr() for t in kept} <= {t.untyped_storage().data_ptr() for t in inputs}
    ref = plain(*inputs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    grads = [torch.randn_like(r) for r in refs]
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and torch.equal(o, r)
    for a, b in zip(torch.autograd.grad(outs, inputs, grads), torch.autograd.grad(refs, inputs, grads)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():  # nothing to keep: the plain expression
        assert all(torch.equal(o, r) for o, r in zip(
            fn(*inputs) if isinstance(out, tuple) else (fn(*inputs),), refs))


def test_query_key_with_only_the_query_used():
    gate, weight, bias = (t.double().requires_grad_() for t in GATES["query_key"][2](torch.float64))
    query, _ = gates.query_key(gate, weight, bias)
    ref, _ = gates.query_key_plain(gate, weight, bias)
    for a, b in zip(torch.autograd.grad(query.sum(), (gate, weight, bias)),
                    torch.autograd.grad(ref.sum(), (gate, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda g, w, b: gates.query_key(g, w, b), (gate, weight, bias))


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
    for name in ("query_key", "gate_values", "gated_residual"):
        monkeypatch.setattr(gated_attention, name, getattr(gates, name + "_plain"))
    ref_out, ref_grads, ref_kept = run()
    assert torch.equal(out, ref_out)
    # each gate's gradients are bit-identical (above); in a layer, the layer input's gradient is summed from its
    # uses in another order (the gated residual hands it one term, not two), which can change the last bit
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # no longer kept per token: sigmoid(residual gate) (d), silu of the query-key and attention gates (z + v) and the
    # float32 difference out - residual (d); newly kept: the dropped output the residual gate mixes in (d)
    d, z, v = config.hidden_size, config.shared_representation_size, config.intermediate_size
    half = 2 if autocast else 4
    assert ref_kept - kept == batch * length * (half * d + half * (z + v) + 4 * d - half * d)
