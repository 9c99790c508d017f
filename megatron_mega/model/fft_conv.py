"""Long convolution of a batch of sequences with one kernel per channel, by FFT, with a hand-written backward.

    y[b, t, d] = sum_s u[b, s, d] * k[d, (t - s) mod n],   t < L,

where u is zero-padded to the FFT length n and k, given as its first K <= n entries, is zero-padded to n as well
(a causal kernel; a bidirectional one passes the whole length-n buffer, its negative lags at the end). With
n >= L + K - 1 the circular convolution is the linear one. The EMA of MEGA is this with k its kernel.

Why not autograd through torch.fft: the backward of rfft(x, n) zero-pads, runs a complex-to-complex FFT on the full
length, clones and slices, and the kernel path adds more padded copies; here backward is real FFTs of the same
size as forward's:
    dL/du = irfft(G * conj(K))[:L],   dL/dk = irfft(sum_b G * conj(U))[:K],   G = rfft(dL/dy padded to n).
The time axis is moved last (contiguous) for the transforms, where they are fastest.

What is kept for backward is u and the kernel's makings, not the spectra U and K: a spectrum is (n/2 + 1) complex
values for L real ones with n ~ 2L, twice the bytes, and u is usually kept anyway (the layer's normalised input,
which the EMA's residual weight also saves). Backward recomputes U and K with two more transforms, which costs less
than holding 8 bytes per token and channel for every layer (16 KiB per token and layer at the 1024-wide GPU
anchor, where a layer keeps 66 KiB per token).

Two entry points, which differ only in what stands for the kernel:
- `fft_convolution(u, kernel, n)` takes the kernel as a tensor and keeps it: (D, K) floats, as many bytes as a
  float32 activation of K tokens (4 KiB per token and layer at D = 1024 and batch 1; a bidirectional buffer is
  n ~ 2-4 L long);
- `fft_convolution_built(u, build, inputs, n)` takes a function that builds the kernel from a few small tensors
  (the EMA's parameters) and keeps those instead, which cost nothing when they are parameters. Forward builds the
  kernel without autograd, so neither the kernel nor what autograd would keep to build it (the EMA's: three
  (D, N, ~sqrt(L)) factors, 3/4 of the kernel's bytes at 4096 tokens) outlives forward; backward builds it again,
  with autograd and under forward's autocast state, for dL/du and to carry dL/dk back to the inputs. The EMA's
  kernel is one (D, L/B, N) x (D, N, B) matrix product with B ~ sqrt(L), N = 16: far cheaper than the FFTs around
  it. The same operations on the same values give the same kernel, so values and gradients are those of building
  the kernel with autograd and calling `fft_convolution`, bit for bit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from megatron_mega.model.recompute import autocast_state, leaf_grads, replay


def _spectrum(x: torch.Tensor, n: int) -> torch.Tensor:
    """rfft over time of x (B, L, D), zero-padded to n: (B, D, n//2 + 1)."""
    # one transposing, zero-padding copy (a single kernel, writing each element once), time last and contiguous
    return torch.fft.rfft(torch.nn.functional.pad(x.transpose(1, 2), (0, n - x.shape[1])))


def _spectral_product(a: torch.Tensor, b: torch.Tensor, conjugate: bool = False, batch_sum: bool = False
                      ) -> torch.Tensor:
    """a * b, or a * conj(b), of two spectra; with `batch_sum` summed over the first (batch) dimension. Traced by
    torch.compile it takes the real form (`_real_form_product`): inductor generates no code for complex tensors,
    so each complex op runs as its own kernel and conj(b) is first copied, where the real form fuses the product,
    the conjugate and the sum into one kernel."""
    if torch.compiler.is_compiling():
        return _real_form_product(a, b, conjugate, batch_sum)
    product = a * (b.conj() if conjugate else b)
    return product.sum(0) if batch_sum else product


def _real_form_product(a: torch.Tensor, b: torch.Tensor, conjugate: bool, batch_sum: bool) -> torch.Tensor:
    a_re, a_im = torch.view_as_real(a).unbind(-1)
    b_re, b_im = torch.view_as_real(b).unbind(-1)
    if conjugate:  # (a_re + i a_im)(b_re - i b_im)
        real, imag = a_re * b_re + a_im * b_im, a_im * b_re - a_re * b_im
    else:
        real, imag = a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re
    if batch_sum:
        real, imag = real.sum(0), imag.sum(0)
    return torch.view_as_complex(torch.stack((real, imag), dim=-1))


def _check_length(kernel: torch.Tensor, n: int) -> None:
    if n < kernel.shape[-1]:
        raise ValueError(f"FFT length {n} is shorter than the kernel ({kernel.shape[-1]})")


def _convolve(u: torch.Tensor, kernel: torch.Tensor, n: int) -> torch.Tensor:
    length = u.shape[1]
    spectrum = _spectral_product(_spectrum(u, n), torch.fft.rfft(kernel, n=n))
    y = torch.fft.irfft(spectrum, n=n)[..., :length]  # (B, D, L)
    return y.transpose(1, 2)


def _grads(grad_y: torch.Tensor, u: torch.Tensor, kernel: torch.Tensor, n: int, need_u: bool, need_kernel: bool):
    grad_f = _spectrum(grad_y, n)
    grad_u = grad_kernel = None
    if need_u:
        grad_u = torch.fft.irfft(_spectral_product(grad_f, torch.fft.rfft(kernel, n=n), conjugate=True), n=n)
        grad_u = grad_u[..., :u.shape[1]].transpose(1, 2)
    if need_kernel:
        spectrum = _spectral_product(grad_f, _spectrum(u, n), conjugate=True, batch_sum=True)
        grad_kernel = torch.fft.irfft(spectrum, n=n)[:, :kernel.shape[-1]]
    return grad_u, grad_kernel


class _FFTConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, kernel: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(u, kernel)
        ctx.n = n
        return _convolve(u, kernel, n)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        u, kernel = ctx.saved_tensors
        return *_grads(grad_y, u, kernel, ctx.n, *ctx.needs_input_grad[:2]), None


class _BuiltFFTConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, n: int, build: Callable[..., torch.Tensor], *inputs: torch.Tensor):
        with torch.no_grad():
            kernel = build(*inputs)
        _check_length(kernel, n)
        ctx.save_for_backward(u, *inputs)
        ctx.n, ctx.build = n, build
        ctx.autocast = autocast_state(u.device.type)
        return _convolve(u, kernel, n)

    @staticmethod
    @once_differentiable  # backward differentiates the rebuilt kernel itself; a graph of that is not kept
    def backward(ctx, grad_y: torch.Tensor):
        u, *inputs = ctx.saved_tensors
        need_kernel = any(ctx.needs_input_grad[3:])
        # the kernel again, from fresh leaves of its inputs under forward's autocast state: the same kernel, to
        # the bit, whose graph reaches the inputs and stops there
        kernel, leaves = replay(ctx.build, inputs, ctx.needs_input_grad[3:], ctx.autocast)
        grad_u, grad_kernel = _grads(grad_y, u, kernel.detach(), ctx.n, ctx.needs_input_grad[0], need_kernel)
        return grad_u, None, None, *leaf_grads(kernel, leaves, grad_kernel)


def fft_convolution(u: torch.Tensor, kernel: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """u (B, L, D), kernel (D, K) -> y (B, L, D) (a transposed view). n: the FFT length, >= K and >= L + (the
    kernel's causal support) - 1; default K (the kernel is already the whole circular buffer)."""
    n = kernel.shape[-1] if n is None else n
    _check_length(kernel, n)
    return _FFTConvolution.apply(u, kernel, n)


def fft_convolution_built(u: torch.Tensor, build: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                          n: int) -> torch.Tensor:
    """`fft_convolution(u, build(*inputs), n)` that keeps `inputs` for backward instead of the kernel and builds
    the kernel again there. `build` must be deterministic, depend on nothing else that needs a gradient, and give
    the same kernel under autograd as without it."""
    return _BuiltFFTConvolution.apply(u, n, build, *inputs)
