"""The hand-written autograd functions and the faster dropout: gradcheck in float64 at small sizes, and equality
with the plain PyTorch expressions they replace (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_mega.model import lm_loss
from megatron_mega.model.attention import ChunkedAttention
from megatron_mega.model import dropout as dropout_module
from megatron_mega.model.dropout import MegaDropout, drop_mask, dropout, dropped_positions
from megatron_mega.model.fft_conv import fft_convolution
from megatron_mega.model.norms import MegaScaleNorm, _ScaleNormFunction
from megatron_mega.model.positional_bias import MegaSimpleRelativePositionalBias
from tests.helpers import tiny_config


# ---------------------------------------------------------------------------------------------- FFT convolution
def plain_fft_convolution(u, kernel):
    n = kernel.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=n) * torch.fft.rfft(kernel), n=n)
    return y[..., :u.shape[1]].transpose(1, 2)


@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 1, 2, 1), (2, 4, 3, 7), (3, 6, 2, 12)])
def test_fft_convolution_gradcheck_and_plain_path(shape):
    batch, length, dim, n = shape
    torch.manual_seed(0)
    u = torch.randn(batch, length, dim, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(dim, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_convolution, (u, kernel))
    out, ref = fft_convolution(u, kernel), plain_fft_convolution(u, kernel)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (u, kernel), grad), torch.autograd.grad(ref, (u, kernel), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 16), (1, 3, 2, 1, 4), (2, 4, 3, 4, 7)])
def test_fft_convolution_pads_a_short_kernel_itself(shape):
    batch, length, dim, k_len, n = shape
    torch.manual_seed(0)
    u = torch.randn(batch, length, dim, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(dim, k_len, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, k: fft_convolution(u, k, n), (u, kernel))
    out, ref = fft_convolution(u, kernel, n), plain_fft_convolution(u, F.pad(kernel, (0, n - k_len)))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (u, kernel), grad), torch.autograd.grad(ref, (u, kernel), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        fft_convolution(u, kernel, k_len - 1)


def test_fft_convolution_keeps_its_inputs_not_their_spectra():
    # the spectra are twice the bytes of the real sequences they come from; backward recomputes them
    u = torch.randn(2, 64, 8, requires_grad=True)
    kernel = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fft_convolution(u, kernel, 128)
    assert [t.data_ptr() for t in saved] == [u.data_ptr(), kernel.data_ptr()]


def test_fft_convolution_is_the_linear_convolution():
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    kernel = torch.randn(3, 6, dtype=torch.float64)
    out = fft_convolution(u, F.pad(kernel, (0, 10)))  # n = 16 >= L + K - 1
    ref = torch.zeros_like(out)
    for t in range(6):
        for s in range(t + 1):
            ref[:, t] += u[:, s] * kernel[:, t - s]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- scale norm
@pytest.mark.parametrize("affine", [True, False])
def test_scale_norm_function_gradcheck_and_plain_path(affine):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    scalar = torch.tensor([1.3], dtype=torch.float64, requires_grad=True) if affine else None
    inputs = (x, scalar) if affine else (x,)
    fn = (lambda x, s: _ScaleNormFunction.apply(x, s, 1e-5)) if affine else (
        lambda x: _ScaleNormFunction.apply(x, None, 1e-5))
    assert torch.autograd.gradcheck(fn, inputs)
    out = fn(*inputs)
    ref = x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + 1e-5)
    if affine:
        ref = scalar * ref
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_scale_norm_module_uses_the_function_and_keeps_other_dims():
    norm = MegaScaleNorm(dim=-1, eps=1e-5).double()
    x = torch.randn(2, 40, 4, dtype=torch.float64)  # 80 rows: more than a decoding step's
    x.requires_grad_()
    assert "ScaleNormFunction" in type(norm(x).grad_fn).__name__
    other = MegaScaleNorm(dim=1, eps=1e-5).double()  # not the last dim: the plain expression
    torch.testing.assert_close(other(x), x * torch.rsqrt(torch.mean(x * x, 1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("affine", [True, False])
def test_scale_norm_of_a_few_rows_is_one_rms_norm_op_with_the_same_values_and_gradients(affine):
    # a decoding step's few rows take F.rms_norm (one kernel where each launch counts); values and gradients agree
    # with the function's, with and without autograd, and one input gives the same bits in both modes
    norm = MegaScaleNorm(dim=-1, eps=1e-5, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.scalar.fill_(1.7)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out = norm(x)
    assert "ScaleNormFunction" not in type(out.grad_fn).__name__
    ref = _ScaleNormFunction.apply(x, norm.scalar, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [x] + ([norm.scalar] if affine else [])
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        assert torch.equal(norm(x), out)


# ---------------------------------------------------------------------------------------------- dropout
def reference_noise(shape, p, dtype=torch.float64):
    """The multiplier our dropout applies after the same seed, from its two ways of drawing."""
    if p <= dropout_module._GEOMETRIC_MAX_P:
        keep = torch.ones(math.prod(shape), dtype=dtype)
        keep[dropped_positions(keep.numel(), p)] = 0.0
        return keep.view(shape) / (1 - p)
    return (torch.rand(shape) >= p).to(dtype) / (1 - p)


def test_a_keep_mask_has_dropout_statistics():
    torch.manual_seed(0)
    p = 0.3
    keep = drop_mask((1000, 1000), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    kept = keep.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / 1e6)  # 5 sigma


@pytest.mark.parametrize("p", [0.1, 0.25])
def test_dropped_positions_are_iid_bernoulli(p):
    torch.manual_seed(0)
    n = 2_000_000
    positions = dropped_positions(n, p)
    assert positions.dtype == torch.int64 and bool((positions[1:] > positions[:-1]).all())
    assert int(positions[0]) >= 0 and int(positions[-1]) < n
    drops = torch.zeros(n, dtype=torch.bool)
    drops[positions] = True
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(drops.double().mean().item() - p) < 5 * sigma
    # independence of neighbours: P(drop at i+1 | drop at i) = p, and the gaps are geometric
    after_drop = drops[1:][drops[:-1]].double().mean().item()
    assert abs(after_drop - p) < 5 * math.sqrt(p * (1 - p) / (n * p))
    gaps = (positions[1:] - positions[:-1] - 1).double()
    assert abs(gaps.mean().item() - (1 - p) / p) < 5 * math.sqrt((1 - p) / p ** 2 / len(gaps))
    for k in (0, 1, 5):
        frac = (gaps == k).double().mean().item()
        expected = (1 - p) ** k * p
        assert abs(frac - expected) < 5 * math.sqrt(expected * (1 - expected) / len(gaps))


def test_dropped_positions_draw_more_when_short(monkeypatch):
    monkeypatch.setattr(dropout_module, "_draw_count", lambda mean, first: 3)  # far too few: many rounds
    torch.manual_seed(1)
    positions = dropped_positions(1000, 0.2)
    assert bool((positions[1:] > positions[:-1]).all()) and int(positions[-1]) < 1000
    assert 100 < len(positions) < 300
    assert len(dropped_positions(0, 0.2)) == 0


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_gradient_is_the_mask_and_eval_is_identity(p):
    x = torch.randn(4, 50, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()  # strided input too
    torch.manual_seed(3)
    out = dropout(x, p)
    torch.manual_seed(3)
    noise = reference_noise(x.shape, p)
    torch.testing.assert_close(out, x * noise)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(grad, grad_out * noise)
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x
    module = MegaDropout(p).eval()
    assert module(x) is x


def test_dropout_gradcheck():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def fn(x):
        torch.manual_seed(5)
        return dropout(x, 0.2)

    assert torch.autograd.gradcheck(fn, (x,))


# ---------------------------------------------------------------------------------------------- attention with dropout
@pytest.mark.parametrize("p", [0.25, 0.4])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_training_attention_with_dropout_equals_plain_expression(chunk, padded, p):
    config = tiny_config(attention_activation="softmax", relative_positional_bias="simple",
                         use_chunking=chunk is not None, chunk_size=chunk or -1)
    bias = MegaSimpleRelativePositionalBias(config).double()
    torch.nn.init.normal_(bias.rel_pos_bias, std=0.5)
    attention = ChunkedAttention(config, p).train()
    torch.manual_seed(0)
    q = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
    mask = None
    if padded:
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[0, 6:] = False
    torch.manual_seed(7)
    out, _ = attention(q, k, v, mask, bias)

    # the reference: per chunk, softmax(q k^T / sqrt(z) + bias + padding), dropped with the same draws, @ v
    c = chunk or 8
    qc, kc, vc = (t.reshape(2 * (8 // c), c, t.shape[-1]) for t in (q, k, v))
    positions = torch.arange(c)
    scores = qc @ kc.transpose(1, 2) / math.sqrt(16) + bias(positions, positions)
    if mask is not None:
        padding = torch.zeros(2, 8, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min / 4)
        scores = scores + padding.reshape(2 * (8 // c), 1, c)
    torch.manual_seed(7)
    noise = reference_noise(scores.shape, p)
    ref = ((torch.softmax(scores, -1) * noise) @ vc).reshape(2, 8, 12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    params = (q, k, v, bias.rel_pos_bias)
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- LM loss
def test_linear_cross_entropy_at_unit_upstream_gradient_equals_cross_entropy():
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    out = lm_loss.linear_cross_entropy(hidden, weight, bias, targets)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (hidden, weight, bias)), torch.autograd.grad(ref, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blocks", [1, 3, 50])
def test_linear_cross_entropy_over_vocabulary_blocks_and_row_chunks(monkeypatch, blocks):
    monkeypatch.setattr(lm_loss, "_CHUNK_ELEMENTS", 50 * 4)  # row chunks of 4 rows, the last one short
    monkeypatch.setattr(lm_loss, "_BLOCK_ELEMENTS", 4 * blocks)  # vocabulary blocks of `blocks` words
    hidden = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    targets[:3] = 7  # repeated targets: their one-hot parts add up
    out = lm_loss.linear_cross_entropy(hidden, weight, bias, targets)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = (hidden, weight, bias)
    for a, b in zip(torch.autograd.grad(0.5 * out, params), torch.autograd.grad(0.5 * ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if blocks == 3:  # gradcheck differentiates numerically input by input: once is enough (and slow)
        assert torch.autograd.gradcheck(lambda h, w, b: lm_loss.linear_cross_entropy(h, w, b, targets), params)
    no_bias = lm_loss.linear_cross_entropy(hidden, weight, None, targets)
    torch.testing.assert_close(no_bias, F.cross_entropy(F.linear(hidden, weight), targets), rtol=1e-12, atol=1e-12)
