"""Multi-dimensional damped EMA (MEGA section 2.2), batch-first.

Each of the hidden channels d is expanded into N dimensions, smoothed by a damped EMA and projected back:

    h[t, n] = p[n] * beta[n] * x[t] + (1 - p[n] * a[n]) * h[t-1, n]
    y[t]    = sum_n eta[n] * h[t, n] / sqrt(N)

which is a convolution of x with the kernel k[l] = sum_n eta[n] p[n] beta[n] q[n]^l / sqrt(N), q = 1 - p * a.

Three ways to compute it, all exact:
- full sequence: the recurrence by chunks of 64 tokens (model/chunked_ema.py: a Toeplitz product within each
  chunk, the N states carried between chunks), causal or bidirectional (a second EMA reading the future); an EMA
  with a truncated kernel (`truncation`), which has no finite state, by one FFT convolution (model/fft_conv.py);
- decoding: the recurrence itself, from a (batch, hidden, N) state, O(hidden * N) per token whatever the context;
- prefill with a state: the same chunked products, the state entering the first chunk, and the state after the
  last token taken from the last chunk's (no (hidden, N, L) powers).

Training keeps no kernel or matrix for backward, only the EMA's input and its four parameters, from which backward
builds the matrices (or the FFT's kernel) again.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mega.model.chunked_ema import chunked_ema, chunked_ema_plain, chunked_ema_with_state
from megatron_mega.model.derived import DerivedTensors
from megatron_mega.model.fft_conv import fft_convolution, fft_convolution_built
from megatron_mega.model.recompute import recomputing


def _fft_size(n: int) -> int:
    """Smallest power of two >= n: the fastest transform length for pocketfft and cuFFT alike."""
    return 1 << max(0, math.ceil(math.log2(n)))


class MegaMultiDimensionDampedEma(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.ndim = config.ema_projection_size
        self.bidirectional = config.bidirectional
        self.truncation = config.truncation
        self.scale = math.sqrt(1.0 / self.ndim)
        kernel_dim = 2 * config.hidden_size if self.bidirectional else config.hidden_size
        # names follow transformers; the paper's symbols in comments
        self.damping_factor = nn.Parameter(torch.empty(kernel_dim, self.ndim, 1))  # delta -> p = sigmoid(delta)
        self.decay_factor = nn.Parameter(torch.empty(kernel_dim, self.ndim, 1))  # alpha -> a = sigmoid(alpha)
        self.ema_expansion_matrix = nn.Parameter(torch.empty(kernel_dim, self.ndim, 1))  # beta
        self.kernel_projection_matrix = nn.Parameter(torch.empty(kernel_dim, self.ndim))  # eta
        self.residual_weight = nn.Parameter(torch.empty(config.hidden_size))  # omega
        self._derived = DerivedTensors()

    # ------------------------------------------------------------------ coefficients and kernel
    def kernel_parameters(self) -> tuple[torch.Tensor, ...]:
        """The parameters the kernel is made of (delta, alpha, beta, eta)."""
        return self.damping_factor, self.decay_factor, self.ema_expansion_matrix, self.kernel_projection_matrix

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input weight p*beta, decay q, output weight eta/sqrt(N)), each (kernel_dim, N), in `dtype`; memoised
        while autograd is off (decoding asks for them at every token)."""
        params = self.kernel_parameters()
        return self._derived.get(params, dtype, lambda: self._coefficients(dtype, params))

    def _coefficients(self, dtype: torch.dtype, params: tuple[torch.Tensor, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        damping, decay, expansion, projection = params
        p = torch.sigmoid(damping.to(dtype)).squeeze(-1)
        # q = 1 - p a rounds to 0 when both sigmoids round to 1 (damping and decay ~17 in float32): log q would be
        # -inf and q^0 = exp(0 * log q) NaN; the smallest positive q gives the same outputs, finite
        q = (1.0 - p * torch.sigmoid(decay.to(dtype)).squeeze(-1)).clamp_min(torch.finfo(dtype).tiny)
        return p * expansion.to(dtype).squeeze(-1), q, projection.to(dtype) * self.scale

    def kernel(self, length: int, dtype: torch.dtype, params: Optional[tuple[torch.Tensor, ...]] = None
               ) -> torch.Tensor:
        """The convolution kernel k[d, l] for l < length, shape (kernel_dim, length), from `params` (default the
        module's own, `kernel_parameters()`).

        k[d, l] = sum_n c[d, n] q[d, n]^l is a (length x N) Vandermonde product per channel. Writing l = i*B + j with
        B ~ sqrt(length), q^l = q^(iB) q^j turns it into one batched matrix multiply of (length/B x N) by (N x B):
        no (kernel_dim, N, length) tensor is built, in the forward or the backward pass."""
        weight, q, out = self.coefficients(dtype) if params is None else self._coefficients(dtype, params)
        block = max(1, math.isqrt(length - 1) + 1) if length > 1 else 1
        rows = -(-length // block)
        log_q = torch.log(q).unsqueeze(-1)  # q is in (0, 1): finite log, powers cannot overflow
        fine = torch.exp(torch.arange(block, device=q.device, dtype=dtype) * log_q)  # q^j, (D, N, B)
        coarse = torch.exp(torch.arange(rows, device=q.device, dtype=dtype) * block * log_q)  # q^(iB), (D, N, R)
        kernel = torch.bmm(coarse.transpose(1, 2), (weight * out).unsqueeze(-1) * fine)  # (D, R, B)
        return kernel.reshape(kernel.shape[0], rows * block)[:, :length]

    def _circular_kernel(self, k_len: int, n: int, dtype: torch.dtype, *params: torch.Tensor
                         ) -> torch.Tensor:
        """What the FFT convolves with: the causal kernel (D, K), or for a bidirectional EMA the whole length-n
        circular buffer, its anti-causal half at negative lags (the end)."""
        kernel = self.kernel(k_len, dtype, params)
        if not self.bidirectional:
            return kernel
        dim = kernel.shape[0] // 2
        forward, backward = kernel[:dim], kernel[dim:]
        # built by concatenation rather than slice assignment into zeros: its backward is plain slicing
        parts = [forward[:, :1] + backward[:, :1], forward[:, 1:],
                 kernel.new_zeros(dim, n - 2 * k_len + 1), backward[:, 1:].flip(-1)]
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        state: Optional[torch.Tensor] = None,
        return_state: bool = False,
        activate: bool = True,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, L, D); mask: (B, L), 1/True = token, 0/False = padding (zeroed before smoothing);
        state: (B, D, N) EMA state after the previous tokens. Returns silu(ema(x) + omega * x) and, when
        `return_state`, the state after the last token. `activate=False`: ema(x) + omega * x, the silu left to the
        caller (one that recomputes it in backward rather than keep its output)."""
        # the convolution and the recurrence run in float32 for half precision inputs and in float64 for float64
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        u = x.to(compute_dtype)
        if mask is not None:
            u = u * mask.unsqueeze(-1).to(compute_dtype)
        recurrent = state is not None or return_state
        if recurrent:
            if self.bidirectional:
                raise RuntimeError("a bidirectional EMA reads future tokens and cannot be decoded incrementally")
            if self.truncation is not None:
                raise RuntimeError(
                    "an EMA with `truncation` has no finite recurrent state; decode with use_cache=False")
        # the residual omega * x: without padding (where it reads x, not the zeroed u) it is part of the
        # convolution's lag 0, with no pass of its own forward or backward
        fold = mask is None
        residual = None if fold else x * self.residual_weight
        folded = self.residual_weight if fold else None
        # under autocast the kernel's matrix multiply would run in bfloat16 and round q^l to 3 digits: the decay
        # powers and the convolution stay in compute_dtype
        with torch.autocast(device_type=u.device.type, enabled=False):
            if recurrent:
                y, new_state = self._recurrent(u, state, folded)
            else:
                y, new_state = self._convolve(u, folded), None
        if fold:
            # the convolution hands back a transposed view: one copy to x's (B, L, D) layout and dtype, so that no
            # transposed tensor reaches the Linears downstream (each would copy it again)
            out = y.contiguous() if y.dtype == x.dtype else y.to(x.dtype, memory_format=torch.contiguous_format)
        else:
            out = residual.add_(y.to(x.dtype))  # in place: the sum keeps x's layout
        return (F.silu(out) if activate else out), new_state

    def _convolve(self, u: torch.Tensor, residual_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-sequence EMA, plus residual_weight * u if given. u: (B, L, D) -> (B, L, D) (a transposed view)."""
        params = self.kernel_parameters()
        if self.truncation is None:
            # the recurrence by chunks (model/chunked_ema.py): fewer bytes moved than the FFT's, and exact
            if recomputing():
                # keeps u and the parameters for backward; the matrices are rebuilt from the parameters there
                return chunked_ema(u, functools.partial(self._coefficients_of, u.dtype), params, self.bidirectional,
                                   residual=residual_weight)
            # without autograd nothing is kept; under torch.compile the plain ops trace into the block's one graph
            # (tests/model/test_traceable.py) and the compiler decides what backward keeps or recomputes
            return chunked_ema_plain(u, self._coefficients(u.dtype, params), self.bidirectional,
                                     residual=residual_weight)
        # a truncated kernel has no finite state: its convolution is by FFT
        y = self._fft_convolve(u, min(self.truncation, u.shape[1]))
        return y if residual_weight is None else y + residual_weight.to(u.dtype) * u

    def _fft_convolve(self, u: torch.Tensor, k_len: int) -> torch.Tensor:
        """The EMA with its kernel cut to k_len lags, by FFT (model/fft_conv.py). u: (B, L, D) -> (B, L, D)."""
        params = self.kernel_parameters()
        # linear (not circular) convolution needs n >= L + K - 1; the anti-causal half of a bidirectional kernel is
        # placed at negative lags (the end of the buffer), which the same bound keeps apart from the outputs
        n = _fft_size(u.shape[1] + k_len - 1)
        build = functools.partial(self._circular_kernel, k_len, n, u.dtype)
        if recomputing():
            # the kernel is (D, K) floats, or (D, n) bidirectional, as many bytes as an activation: backward builds it
            # again from the parameters (a small matrix product) rather than keep it
            return fft_convolution_built(u, build, params, n)
        return fft_convolution(u, build(*params), n)  # zero-padded to n inside

    def _coefficients_of(self, dtype: torch.dtype, *params: torch.Tensor):
        return self._coefficients(dtype, params)

    def _recurrent(self, u: torch.Tensor, state: Optional[torch.Tensor], residual_weight: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal EMA continuing from `state`, plus residual_weight * u if given. u: (B, L, D); state: (B, D, N) or
        None."""
        weight, q, out = self.coefficients(u.dtype)  # (D, N) each
        length = u.shape[1]
        if length == 1:
            # one decoding step: the recurrence itself, O(D * N)
            h = weight * u[:, 0, :, None]
            if state is not None:
                h = h + q * state.to(u.dtype)
            y = torch.einsum("bdn,dn->bd", h, out).unsqueeze(1)
            return (y if residual_weight is None else torch.addcmul(y, u, residual_weight.to(u.dtype))), h
        # a prefill: the chunked recurrence, which also gives the state after the last token (model/chunked_ema.py);
        # from rest, its outputs are the full-sequence path's to the bit
        return chunked_ema_with_state(u, (weight, q, out), state, residual=residual_weight)
