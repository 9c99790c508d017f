"""The EMA's convolution as a chunked recurrence (model/chunked_ema.py) against the FFT convolution and the plain
recurrence: values and every gradient to float64 rounding, causal and bidirectional, one chunk, a partial last
chunk and scans of several levels; the plain-ops path against the autograd function; a gradcheck; what backward
keeps; float32 accuracy over long sequences and extreme decays."""

import pytest
import torch

from megatron_mega.model import chunked_ema as chunked
from megatron_mega.model.chunked_ema import chunked_ema, chunked_ema_plain, chunked_ema_with_state
from megatron_mega.model.ema import MegaMultiDimensionDampedEma
from tests.model.test_fft_conv import fft_path, kept_storages, make_ema


def coefficients(ema: MegaMultiDimensionDampedEma, dtype=torch.float64):
    return lambda *params: ema._coefficients(dtype, params)


def recurrence(u: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, out: torch.Tensor, reverse: bool = False,
               state=None, with_state: bool = False):
    """h[t] = q h[t-1] + weight u[t], y[t] = sum_n out h[t], token by token (reversed: from the end), from
    `state` (B, D, N) or rest; with_state: also the last h."""
    batch, length, dim = u.shape
    h = u.new_zeros(batch, dim, q.shape[1]) if state is None else state
    y = torch.empty_like(u)
    for t in (reversed(range(length)) if reverse else range(length)):
        h = q * h + weight * u[:, t, :, None]
        y[:, t] = (h * out).sum(-1)
    return (y, h) if with_state else y


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_ema_values_and_gradients_equal_the_fft_convolutions(bidirectional, length, monkeypatch):
    ema = make_ema(bidirectional)  # float64, hidden 32, N = 16
    x = torch.randn(2, length, 32, dtype=torch.float64)
    grad = torch.randn(2, length, 32, dtype=torch.float64)

    def run(fft: bool):
        with monkeypatch.context() as patch:
            if fft:
                patch.setattr(ema, "_convolve", lambda u, r=None: fft_path(ema, u, r))
            ema.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_()
            out, _ = ema(leaf)
            out.backward(grad)
        return [out.detach(), leaf.grad] + [p.grad for p in ema.parameters()]

    for name, a, b in zip(["out", "x"] + [n for n, _ in ema.named_parameters()], run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anti-causal"])
def test_scans_of_several_levels_equal_the_recurrence(chunk, reverse):
    # 700 tokens in chunks of 1, 2 and 5: 700, 350 and 140 chunks, scanned in 3, 3 and 2 levels of 16
    torch.manual_seed(0)
    dim, n = 3, 4
    weight, out = torch.randn(dim, n, dtype=torch.float64), torch.randn(dim, n, dtype=torch.float64)
    q = torch.rand(dim, n, dtype=torch.float64) * 0.2 + 0.79  # slow decays: the state reaches across chunks
    u = torch.randn(2, 700, dim, dtype=torch.float64)
    parts = [chunked.causal_part(weight, q, out, chunk, -(-700 // chunk))]
    assert len(parts[0].levels) == {1: 3, 2: 3, 5: 2}[chunk]
    if reverse:
        parts = [chunked.turned(parts[0])]
    x = chunked._to_chunks(u, chunk)
    y = chunked._from_chunks(chunked._convolve(x, parts, 2), 2, 700)
    torch.testing.assert_close(y, recurrence(u, weight, q, out, reverse), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_the_plain_path_equals_the_autograd_function(bidirectional):
    # what torch.compile traces and passes without autograd run, against the function training runs
    ema = make_ema(bidirectional, hidden=8)
    params = ema.kernel_parameters()
    u = torch.randn(3, 150, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 150, 8, dtype=torch.float64)
    function = chunked_ema(u, coefficients(ema), params, bidirectional, chunk=8)
    plain = chunked_ema_plain(u, coefficients(ema)(*params), bidirectional, chunk=8)
    torch.testing.assert_close(function, plain, rtol=1e-13, atol=1e-13)
    for a, b in zip(torch.autograd.grad(function, [u, *params], grad), torch.autograd.grad(plain, [u, *params], grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max()))


@pytest.mark.parametrize("wanted", ["all", "input", "parameters"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_gradcheck(bidirectional, wanted):
    ema = make_ema(bidirectional, hidden=2)
    params = [p.detach().clone().requires_grad_(wanted != "input") for p in ema.kernel_parameters()]
    u = torch.randn(2, 11, 2, dtype=torch.float64, requires_grad=wanted != "parameters")
    assert torch.autograd.gradcheck(lambda u, *p: chunked_ema(u, coefficients(ema), p, bidirectional, chunk=3),
                                    (u, *params))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_keeps_the_input_and_the_parameters_only(bidirectional):
    ema = make_ema(bidirectional, dtype=torch.float32)
    params = ema.kernel_parameters()
    u = torch.randn(2, 300, 32, requires_grad=True)
    kept, y = kept_storages(lambda: chunked_ema(u, coefficients(ema, torch.float32), params, bidirectional))
    assert set(kept) == {t.untyped_storage().data_ptr() for t in (u, *params)}
    assert y.shape == u.shape


def test_float32_over_long_sequences_and_extreme_decays():
    # decays from 1e-30 (gone after a token) to 1 - 6e-8 (hardly decaying over 20k tokens): the powers of the scan
    # stay finite, and float32 stays within ~1e-6 of the float64 result
    torch.manual_seed(0)
    dim, n, length = 4, 16, 20000
    q = torch.logspace(-30, 0, dim * n, dtype=torch.float64).view(dim, n).clamp(max=1 - 6e-8)
    weight, out = torch.rand(dim, n, dtype=torch.float64), torch.randn(dim, n, dtype=torch.float64) / 4
    u = torch.randn(1, length, dim, dtype=torch.float64)
    exact = chunked_ema_plain(u, (weight, q, out))
    single = chunked_ema_plain(u.float(), (weight.float(), q.float(), out.float()))
    assert torch.isfinite(single).all()
    scale = exact.abs().amax(1, keepdim=True)
    assert float(((single.double() - exact).abs() / scale).max()) < 2e-5
    # and the float64 result is the recurrence's on the tokens it can afford
    torch.testing.assert_close(exact[:, :300], recurrence(u[:, :300], weight, q, out), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("from_rest", [True, False], ids=["from rest", "from a state"])
@pytest.mark.parametrize("length,chunk", [(1, 64), (7, 64), (64, 64), (65, 64), (300, 4), (700, 2)])
def test_prefill_with_a_state_equals_the_recurrence(length, chunk, from_rest):
    # the prefill of cached decoding: outputs and the state after the last token, from rest or continuing a state,
    # whole and partial last chunks, scans of one to three levels
    torch.manual_seed(0)
    dim, n = 3, 4
    weight, out = torch.randn(dim, n, dtype=torch.float64), torch.randn(dim, n, dtype=torch.float64)
    q = torch.rand(dim, n, dtype=torch.float64) * 0.2 + 0.79
    u = torch.randn(2, length, dim, dtype=torch.float64)
    state = None if from_rest else torch.randn(2, dim, n, dtype=torch.float64)
    y, new_state = chunked_ema_with_state(u, (weight, q, out), state, chunk)
    want_y, want_state = recurrence(u, weight, q, out, state=state, with_state=True)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state, want_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_a_backward_inside_autocast_stays_in_float32(bidirectional):
    # the EMA turns autocast off around its forward; a backward called inside an autocast region (which would cast
    # its matrix products to bfloat16) gives the gradients of one called outside it, to the bit
    ema = make_ema(bidirectional, dtype=torch.float32)
    params = ema.kernel_parameters()
    u = torch.randn(2, 200, 32, requires_grad=True)
    grad = torch.randn(2, 200, 32)

    def grads(inside: bool):
        y = chunked_ema(u, coefficients(ema, torch.float32), params, bidirectional)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            return torch.autograd.grad(y, [u, *params], grad)

    for a, b in zip(grads(True), grads(False)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_the_residual_folded_into_lag_zero_is_the_residual_added(bidirectional):
    # chunked_ema(..., residual=omega) = the convolution + omega * u: values and gradients (omega's included),
    # through the autograd function, the plain ops and a gradcheck
    ema = make_ema(bidirectional, hidden=8)
    params, omega = ema.kernel_parameters(), ema.residual_weight
    u = torch.randn(2, 150, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 150, 8, dtype=torch.float64)
    want = chunked_ema(u, coefficients(ema), params, bidirectional, chunk=8) + omega * u
    want_grads = torch.autograd.grad(want, [u, omega, *params], grad)
    for got in (chunked_ema(u, coefficients(ema), params, bidirectional, chunk=8, residual=omega),
                chunked_ema_plain(u, coefficients(ema)(*params), bidirectional, chunk=8, residual=omega)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
        for a, b in zip(torch.autograd.grad(got, [u, omega, *params], grad), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max()))
    small = make_ema(bidirectional, hidden=2)
    inputs = (torch.randn(2, 11, 2, dtype=torch.float64, requires_grad=True), small.residual_weight,
              *small.kernel_parameters())
    assert torch.autograd.gradcheck(
        lambda u, r, *p: chunked_ema(u, coefficients(small), p, bidirectional, chunk=3, residual=r), inputs)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_the_ema_without_padding_equals_the_ema_with_an_all_true_mask(bidirectional):
    # no mask: the residual is folded into the convolution; an all-true mask takes the separate residual. Same
    # outputs and gradients, in the layer's (B, L, D) layout
    ema = make_ema(bidirectional, dtype=torch.float32)
    x = torch.randn(2, 100, 32)
    grad = torch.randn(2, 100, 32)

    def run(mask):
        ema.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out, _ = ema(leaf, mask)
        out.backward(grad)
        return [out.detach(), leaf.grad] + [p.grad for p in ema.parameters()], out

    (folded, out), (separate, _) = run(None), run(torch.ones(2, 100, dtype=torch.bool))
    assert out.is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bfloat16 input: the copy casts it back
        assert ema(x.bfloat16())[0].is_contiguous()
    for a, b in zip(folded, separate):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * float(b.abs().max()))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_compiled_once_for_every_length_with_as_many_scan_levels(bidirectional):
    # torch.compile with dynamic shapes traces the EMA once for all lengths of 65-1024 tokens (2-16 chunks: one
    # scan level), not once per 64-token band: no branch on the length's remainders, the scan's matrices of one
    # shape (dynamo only: what it would hand a compiler, counted)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    ema = make_ema(bidirectional, dtype=torch.float32, hidden=8)
    counter = CompileCounter()
    compiled = torch.compile(lambda x: ema(x)[0], backend=counter, dynamic=True, fullgraph=True)
    for length in (150, 200, 320, 1000):
        x = torch.randn(2, length, 8, requires_grad=True)
        compiled(x).sum().backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_decays_that_round_to_zero_stay_finite(bidirectional):
    # damping and decay of 40: both sigmoids are 1.0 in float32, so q = 1 - p a is 0; log q must not make NaN
    ema = make_ema(bidirectional, dtype=torch.float32, hidden=8)
    with torch.no_grad():
        ema.damping_factor.fill_(40.0)
        ema.decay_factor.fill_(40.0)
    x = torch.randn(2, 100, 8, requires_grad=True)
    out, _ = ema(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ema.parameters())
    if not bidirectional:  # and decoding agrees: prefill then a step, against the whole sequence
        with torch.no_grad():
            head, state = ema(x[:, :99], return_state=True)
            step, _ = ema(x[:, 99:], state=state, return_state=True)
        torch.testing.assert_close(torch.cat([head, step], 1), out.detach(), rtol=1e-5, atol=1e-5)


def test_a_prefill_from_rest_gives_the_full_sequence_outputs_to_the_bit():
    # generate's first pass (return_state) and a pass without cache run the same products: a model's hidden states
    # with and without use_cache are equal, not only close (tests/convert compares them bit for bit)
    ema = make_ema(False, dtype=torch.float32)
    x = torch.randn(2, 300, 32)
    with torch.no_grad():
        plain, _ = ema(x)
        prefill, state = ema(x, return_state=True)
    assert torch.equal(plain, prefill) and state.shape == (2, 32, ema.ndim)
