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

What is kept for backward is u and the unpadded kernel, not their spectra U and K: a spectrum is (n/2 + 1) complex
values for L real ones with n ~ 2L, twice the bytes, and u is usually kept anyway (the layer's normalised input,
which the EMA's residual weight also saves). Backward recomputes U and K with two more transforms, which costs less
than holding 8 bytes per token and channel for every layer (16 KiB per token and layer at the 1024-wide GPU
anchor, a third of what a layer saves).
"""

from __future__ import annotations

import torch


def _spectrum(x: torch.Tensor, n: int) -> torch.Tensor:
    """rfft over time of x (B, L, D), zero-padded to n: (B, D, n//2 + 1)."""
    batch, length, dim = x.shape
    padded = x.new_zeros(batch, dim, n)
    padded[..., :length].copy_(x.transpose(1, 2))  # one transposing copy; the tail stays zero
    return torch.fft.rfft(padded)


class _FFTConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, kernel: torch.Tensor, n: int) -> torch.Tensor:
        length = u.shape[1]
        y = torch.fft.irfft(_spectrum(u, n) * torch.fft.rfft(kernel, n=n), n=n)[..., :length]  # (B, D, L)
        ctx.save_for_backward(u, kernel)
        ctx.n = n
        return y.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        u, kernel = ctx.saved_tensors
        n = ctx.n
        grad_f = _spectrum(grad_y, n)
        grad_u = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(grad_f * torch.fft.rfft(kernel, n=n).conj(), n=n)
            grad_u = grad_u[..., :u.shape[1]].transpose(1, 2)
        if ctx.needs_input_grad[1]:
            grad_kernel = torch.fft.irfft((grad_f * _spectrum(u, n).conj()).sum(0), n=n)[:, :kernel.shape[-1]]
        return grad_u, grad_kernel, None


def fft_convolution(u: torch.Tensor, kernel: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """u (B, L, D), kernel (D, K) -> y (B, L, D) (a transposed view). n: the FFT length, >= K and >= L + (the
    kernel's causal support) - 1; default K (the kernel is already the whole circular buffer)."""
    n = kernel.shape[-1] if n is None else n
    if n < kernel.shape[-1]:
        raise ValueError(f"FFT length {n} is shorter than the kernel ({kernel.shape[-1]})")
    return _FFTConvolution.apply(u, kernel, n)
