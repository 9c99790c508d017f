"""The FFT convolution that builds its kernel again in backward (fft_conv.fft_convolution_built), as the EMA uses it
for a truncated kernel (and here, forced, for a whole one): the same values and gradients, to the bit, as building
the kernel with autograd and keeping it (the tensor-kernel `fft_convolution`); a gradcheck; and what it keeps for
backward (u and the parameters, no kernel)."""

import pytest
import torch

from megatron_mega.model.ema import MegaMultiDimensionDampedEma, _fft_size
from megatron_mega.model.fft_conv import fft_convolution, fft_convolution_built
from megatron_mega.model.mega_model import MegaModel
from tests.helpers import tiny_config


def make_ema(bidirectional: bool, truncation=None, dtype=torch.float64, hidden=32) -> MegaMultiDimensionDampedEma:
    torch.manual_seed(0)
    config = tiny_config(bidirectional=bidirectional, is_decoder=not bidirectional, truncation=truncation,
                         hidden_size=hidden)
    ema = MegaMultiDimensionDampedEma(config)
    MegaModel(config)._init_weights(ema)
    # the initialisation leaves the residual weight and eta near constants: spread them so every gradient counts
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ema.to(dtype)


def with_residual(y: torch.Tensor, u: torch.Tensor, residual_weight) -> torch.Tensor:
    """What the EMA's `_convolve` adds when handed the residual weight (the EMA folds omega * x in without padding)."""
    return y if residual_weight is None else y + residual_weight.to(u.dtype) * u


def kernel_kept(ema: MegaMultiDimensionDampedEma, u: torch.Tensor, handed: list | None = None,
                residual_weight=None) -> torch.Tensor:
    """The EMA's convolution as it was before the kernel was rebuilt in backward: the kernel built with autograd
    and handed to `fft_convolution` as a tensor, which keeps it (and is appended to `handed`)."""
    handed = [] if handed is None else handed
    _, length, dim = u.shape
    k_len = length if ema.truncation is None else min(ema.truncation, length)
    kernel = ema.kernel(k_len, u.dtype)
    n = _fft_size(length + k_len - 1)
    if ema.bidirectional:
        forward, backward = kernel[:dim], kernel[dim:]
        parts = [forward[:, :1] + backward[:, :1], forward[:, 1:],
                 kernel.new_zeros(dim, n - 2 * k_len + 1), backward[:, 1:].flip(-1)]
        kernel = torch.cat(parts, dim=1)
        handed.append(kernel)
        return with_residual(fft_convolution(u, kernel), u, residual_weight)
    handed.append(kernel)
    return with_residual(fft_convolution(u, kernel, n), u, residual_weight)


def fft_path(ema: MegaMultiDimensionDampedEma, u: torch.Tensor, residual_weight=None) -> torch.Tensor:
    """The EMA's FFT convolution, also where it takes the chunked recurrence (no truncation): its `_convolve`."""
    y = ema._fft_convolve(u, u.shape[1] if ema.truncation is None else min(ema.truncation, u.shape[1]))
    return with_residual(y, u, residual_weight)


def forward_backward(ema, x, old: bool, monkeypatch, autocast: str = ""):
    """Output and the gradients of x and of every parameter (the residual weight's through the layer). autocast:
    "forward" runs the forward under bfloat16 autocast, "both" the backward too."""
    forward_ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast))
    backward_ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "both")
    with monkeypatch.context() as patch:
        old_path = lambda u, r=None: kernel_kept(ema, u, residual_weight=r)  # noqa: E731
        patch.setattr(ema, "_convolve", old_path if old else (lambda u, r=None: fft_path(ema, u, r)))
        x = x.detach().requires_grad_()
        ema.zero_grad(set_to_none=True)
        with forward_ctx:
            out, _ = ema(x)
        with backward_ctx:
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return [out.detach(), x.grad] + [p.grad for p in ema.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("truncation", [None, 5])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length", [1, 7, 50, 64])
def test_rebuilt_kernel_gives_the_kept_kernels_values_and_gradients_to_the_bit(length, bidirectional, truncation,
                                                                                dtype, monkeypatch):
    # the same operations on the same values in the same order: forward builds the kernel as before (only without
    # a graph), backward rebuilds it and runs the very graph the old forward recorded. bfloat16: parameters and
    # input in bfloat16, the kernel and FFT in float32 (the parameters' casts are part of the rebuilt graph)
    ema = make_ema(bidirectional, truncation, dtype)
    x = torch.randn(2, length, 32).to(dtype)
    new = forward_backward(ema, x, False, monkeypatch)
    old = forward_backward(ema, x, True, monkeypatch)
    assert len(new) == 7 and all(g is not None for g in new)
    for name, a, b in zip(["out", "x"] + [n for n, _ in ema.named_parameters()], new, old):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("autocast", ["forward", "both"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_rebuilt_kernel_under_autocast(bidirectional, autocast, monkeypatch):
    # the EMA turns autocast off around its kernel, and backward rebuilds it under forward's autocast state, not
    # under the caller's: a backward called inside an autocast region (which casts the matmuls of every backward,
    # the kept kernel's graph as well) does not get a bfloat16 kernel for dL/du
    ema = make_ema(bidirectional, dtype=torch.float32)
    x = torch.randn(2, 40, 32)
    new = forward_backward(ema, x, False, monkeypatch, autocast)
    old = forward_backward(ema, x, True, monkeypatch, autocast)
    for name, a, b in zip(["out", "x"] + [n for n, _ in ema.named_parameters()], new, old):
        assert torch.equal(a, b), name


def test_without_autograd_the_plain_path_gives_the_same_values(monkeypatch):
    # no_grad builds the kernel and hands it over as a tensor (as torch.compile does): nothing to keep
    ema = make_ema(True, dtype=torch.float32)
    monkeypatch.setattr(ema, "_convolve", lambda u, r=None: fft_path(ema, u, r))
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        plain, _ = ema(x)
    assert torch.equal(plain, ema(x)[0].detach())


# ---------------------------------------------------------------------------------------------- gradcheck
def vandermonde(c: torch.Tensor, q: torch.Tensor, k_len: int = 5) -> torch.Tensor:
    """k[d, l] = sum_n c[d, n] q[d, n]^l: the EMA's kernel in miniature."""
    return (c.unsqueeze(-1) * q.unsqueeze(-1) ** torch.arange(k_len, dtype=q.dtype)).sum(1)


@pytest.mark.parametrize("wanted", [(True, True, True), (False, True, True), (True, False, True), (True, True, False)])
def test_built_convolution_gradcheck(wanted):
    torch.manual_seed(0)
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    c = torch.randn(3, 4, dtype=torch.float64)
    q = torch.rand(3, 4, dtype=torch.float64) * 0.8 + 0.1
    inputs = [t.requires_grad_(w) for t, w in zip((u, c, q), wanted)]
    assert torch.autograd.gradcheck(lambda u, c, q: fft_convolution_built(u, vandermonde, (c, q), 16), inputs)
    # and it is the tensor-kernel convolution
    torch.testing.assert_close(fft_convolution_built(u, vandermonde, (c, q), 16),
                               fft_convolution(u, vandermonde(c, q), 16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        fft_convolution_built(u, vandermonde, (c, q), 4)


@pytest.mark.parametrize("truncation", [None, 3])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_ema_gradcheck_through_the_rebuilt_kernel(bidirectional, truncation, monkeypatch):
    ema = make_ema(bidirectional, truncation, hidden=4)
    monkeypatch.setattr(ema, "_convolve", lambda u, r=None: fft_path(ema, u, r))
    names = [n for n, _ in ema.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in ema.parameters()]
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)

    def layer(x, *params):
        return torch.func.functional_call(ema, dict(zip(names, params)), (x,))[0]

    assert torch.autograd.gradcheck(layer, (x, *params))


# ---------------------------------------------------------------------------------------------- what is kept
def kept_storages(fn) -> tuple[dict, object]:
    """storage pointer -> bytes of every tensor autograd packs for backward while fn() runs, and its result."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return kept, result


def test_built_convolution_keeps_u_and_the_inputs_only():
    u = torch.randn(2, 64, 8, requires_grad=True)
    c, q = torch.randn(8, 4, requires_grad=True), torch.rand(8, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fft_convolution_built(u, vandermonde, (c, q), 128)
    assert [t.data_ptr() for t in saved] == [u.data_ptr(), c.data_ptr(), q.data_ptr()]


@pytest.mark.parametrize("truncation", [None, 20])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_ema_keeps_the_kernel_no_more(bidirectional, truncation, monkeypatch):
    """One EMA forward (hidden 32, L 50, float32) keeps less than before by exactly the kernel the convolution kept
    (a (32, 50) view of a 32 x 56 matmul output causal, 32 x 20 truncated, a 32 x 128 buffer bidirectional) and
    what autograd kept to build it (its factors: O(hidden x N x sqrt(L)))."""
    ema = make_ema(bidirectional, truncation, torch.float32)
    x = torch.randn(2, 50, 32, requires_grad=True)
    ignored = {p.untyped_storage().data_ptr() for p in [x, *ema.parameters()]}

    def layer_bytes(fn):
        kept, _ = kept_storages(fn)
        return sum(nbytes for ptr, nbytes in kept.items() if ptr not in ignored)

    with monkeypatch.context() as patch:
        patch.setattr(ema, "_convolve", lambda u, r=None: fft_path(ema, u, r))
        new = layer_bytes(lambda: ema(x))
    handed = []
    with monkeypatch.context() as patch:
        patch.setattr(ema, "_convolve", lambda u, r=None: kernel_kept(ema, u, handed, r))
        old = layer_bytes(lambda: ema(x))
    (kernel,) = handed
    k_len = 50 if truncation is None else truncation
    assert kernel.shape == ((32, _fft_size(50 + k_len - 1)) if bidirectional else (32, k_len))
    # the kernel's own graph, built alone: sigmoid, exp and matmul operands, three of (2 x) hidden x N x ~sqrt(K)
    # floats (48 / sqrt(K) of the kernel at N = 16: 3/4 of it at 4096 tokens), the rest hidden x N; the bidirectional
    # buffer's concatenation, flip and slices keep nothing
    factors = layer_bytes(lambda: ema.kernel(k_len, torch.float32))
    assert factors > 0
    assert old - new == kernel.untyped_storage().nbytes() + factors


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_ema_with_frozen_kernel_parameters_keeps_exactly_one_kernel_less(bidirectional, monkeypatch):
    # with the kernel's parameters frozen, the old path kept the kernel and nothing to build it: the difference is
    # the kernel's bytes alone (hidden x L x 4 causal, hidden x n x 4 bidirectional)
    ema = make_ema(bidirectional, dtype=torch.float32)
    for p in ema.kernel_parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 64, 32, requires_grad=True)
    ignored = {p.untyped_storage().data_ptr() for p in [x, *ema.parameters()]}

    def layer_bytes():
        kept, _ = kept_storages(lambda: ema(x))
        return sum(nbytes for ptr, nbytes in kept.items() if ptr not in ignored)

    with monkeypatch.context() as patch:
        patch.setattr(ema, "_convolve", lambda u, r=None: fft_path(ema, u, r))
        new = layer_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(ema, "_convolve", lambda u, r=None: kernel_kept(ema, u, residual_weight=r))
        old = layer_bytes()
    assert old - new == 32 * (_fft_size(127) if bidirectional else 64) * 4


@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("batch_sum", [False, True])
def test_real_form_of_the_spectral_product_equals_the_complex_one(conjugate, batch_sum):
    """What torch.compile traces (fft_conv._real_form_product) against the eager complex product."""
    from megatron_mega.model.fft_conv import _real_form_product, _spectral_product

    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 17, dtype=torch.complex128), torch.randn(3, 5, 17, dtype=torch.complex128)
    torch.testing.assert_close(_real_form_product(a, b, conjugate, batch_sum),
                               _spectral_product(a, b, conjugate, batch_sum), rtol=1e-14, atol=1e-14)
