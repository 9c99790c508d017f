"""Long convolution of a batch of sequences with one kernel per channel, by FFT, with a hand-written backward.

    y[b, t, d] = sum_s u[b, s, d] * k[d, (t - s) mod n],   t < L,

where u is zero-padded to the FFT length n and k is a length-n buffer per channel (a causal kernel in its first
entries; a bidirectional one also at the end, as negative lags). With n >= L + K - 1 the circular convolution is the
linear one. The EMA of MEGA is this with k its kernel.

Why not autograd through torch.fft: the backward of rfft(x, n) zero-pads, runs a complex-to-complex FFT on the full
length, clones and slices, and the kernel path adds more padded copies; here backward is three real FFTs of the
same size as forward's (the gradient's rfft, one irfft for the input, one batch-summed irfft for the kernel):
    dL/du = irfft(G * conj(K))[:L],   dL/dk = irfft(sum_b G * conj(U)),   G = rfft(dL/dy padded to n).
The time axis is moved last (contiguous) for the transforms, where they are fastest.
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
    def forward(ctx, u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        length = u.shape[1]
        n = kernel.shape[-1]
        kernel_f = torch.fft.rfft(kernel)  # (D, n//2 + 1)
        u_f = _spectrum(u, n)
        y = torch.fft.irfft(u_f * kernel_f, n=n)[..., :length]  # (B, D, L)
        ctx.save_for_backward(u_f, kernel_f)
        ctx.length, ctx.n = length, n
        return y.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        u_f, kernel_f = ctx.saved_tensors
        n = ctx.n
        grad_f = _spectrum(grad_y, n)
        grad_u = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(grad_f * kernel_f.conj(), n=n)[..., :ctx.length].transpose(1, 2)
        if ctx.needs_input_grad[1]:
            grad_kernel = torch.fft.irfft((grad_f * u_f.conj()).sum(0), n=n)
        return grad_u, grad_kernel


def fft_convolution(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """u (B, L, D), kernel (D, n) with n >= L + (kernel support) - 1 -> y (B, L, D) (a transposed view)."""
    return _FFTConvolution.apply(u, kernel)
