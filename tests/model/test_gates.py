"""MEGA's gates as functions that recompute their activations in backward (model/gates.py): what they keep, and
that each gives the values and gradients of autograd of its plain expression, to the bit. In a whole block, with
the recomputed linears: tests/model/test_recompute.py."""

import pytest
import torch

from megatron_mega.model import gates
from tests.helpers import kept_for_backward


GATES = {
    "query_key": (gates.query_key, gates.query_key_plain, lambda dt: (
        torch.randn(2, 5, 6, dtype=dt), torch.randn(2, 6), torch.randn(2, 6))),
    "gated_residual": (gates.gated_residual, gates.gated_residual_plain, lambda dt: (
        torch.randn(2, 5, 6), torch.randn(2, 5, 6, dtype=dt), torch.randn(2, 5, 6, dtype=dt))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(GATES))
def test_gate_keeps_only_its_inputs_and_gives_autograd_gradients(name, dtype):
    fn, plain, make = GATES[name]
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in make(dtype)]
    out, kept = kept_for_backward(lambda: fn(*inputs))
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
