"""The EMA's long convolution as a chunked linear recurrence: matrix products per chunk of 64 tokens, no FFT.

MEGA's EMA is a linear recurrence with N states per channel, y = K u with the kernel
k[d, l] = sum_n c[d, n] q[d, n]^l (model/ema.py). Cut the sequence into chunks of T tokens, t = cT + i:

    y[cT + i] = sum_{j <= i} k[i - j] u[cT + j]          within the chunk: a (T x T) Toeplitz product
              + sum_n c[n] q[n]^(i + 1) h[c, n]            what came before: the state entering chunk c
    h[c, n]   = r[n] h[c - 1, n] + s[c - 1, n],           r = q^T,  s[c, n] = sum_j q[n]^(T - 1 - j) u[cT + j]

Per channel these are products with (T x T), (T x N) and (N x T) matrices, batched over the channels; the
recurrence between chunks (`_scan`) is over L/T steps of N-vectors, solved as products with small matrices of
powers of r. An anti-causal EMA (the second half of a bidirectional one) is the same with time reversed (`turned`).
The transpose of a causal convolution is the anti-causal one with the same kernel, so backward's gradient for u is
this operation again, turned; the parameters' gradients come from the three products' gradients and
dL/dr = sum_c dL/ds[c] h[c] (the recurrence's adjoint), carried to the parameters by autograd of the small
matrices rebuilt from them.

Why not the FFT (model/fft_conv.py): a linear convolution by FFT pads to twice the length and moves complex
spectra through four transforms, three products and two transposing copies, forward and backward; see
`benchmarks/gpu_cost_model.py` for what each costs at the GPU anchor. Here the FLOPs, 2 (T + 2N) per token and
channel each way, are small at T = 64, and nothing is twice the sequence. The FFT stays for a truncated kernel
(`truncation`), which has no finite state.

Layout: the channels lead, (D, B*C, T), so that each product is one batched matrix multiply: one transposing copy
in, and the output handed back as a transposed (B, L, D) view, as the FFT path does. The states are (D, N, B*C).
What is kept for backward: u (the layer's normalised input, kept anyway) and the parameters.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_mega.model.recompute import autocast_state, replay

# chunk length: the Toeplitz product costs 2T FLOPs per token and channel, the state products 4N; at 64 both are
# small against the bytes moved, and the states are a quarter of the input's size (N = 16)
CHUNK = 64
# the scan between chunks solves groups of this many chunks as one product with a (G x G) matrix of powers per
# channel and state, then scans the groups' ends the same way
_GROUP = 16


class ScanLevel(NamedTuple):
    """One level of the scan between chunks: matrix (D, N, g, g), [c', c] = r^(c - 1 - c') for c' < c, else 0
    (g = the level's steps, up to _GROUP); powers (D, N, _GROUP) = r^i, or None at the last level."""

    matrix: torch.Tensor
    powers: Optional[torch.Tensor]


class Part(NamedTuple):
    """One direction of the EMA: kernel (D, T), its first T lags (the within-chunk matrix is built from all
    directions' kernels at once, `_intra`); oriented, to_state (D, N, T) takes a chunk to its state, from_state
    (D, N, T) a state into the next chunk; log_decay (D, N) is the log of r, the decay over a whole chunk; levels,
    the scan's powers of r; reverse: anti-causal."""

    kernel: torch.Tensor
    to_state: torch.Tensor
    from_state: torch.Tensor
    log_decay: torch.Tensor
    levels: tuple[ScanLevel, ...]
    reverse: bool


def chunk_length(length: int, chunk: int = CHUNK) -> int:
    return max(1, min(chunk, length))


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """x zero-padded at the end of its last dimension to `size`, contiguous. Traced by torch.compile, without a
    branch on whether anything is added (a branch on the sequence length becomes a guard, and every length that
    takes the other side a new graph)."""
    if torch.compiler.is_compiling():
        return F.pad(x, (0, size - x.shape[-1])).contiguous()
    return F.pad(x, (0, size - x.shape[-1])) if size != x.shape[-1] else x.contiguous()


def _toeplitz(lags: torch.Tensor, n: int) -> torch.Tensor:
    """(..., 2n - 1) two-sided lags, lags[n - 1 + m] = lag m -> (..., n, n) with [j, i] = lag i - j: windows of the
    lags, rows reversed (one copy; no index tensors, no exponentials of the whole matrix)."""
    return lags.unfold(-1, n, 1).flip(-2)


def _upper_toeplitz(values: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., n, n) with [j, i] = values[i - j] for i >= j, else 0."""
    n = values.shape[-1]
    return _toeplitz(F.pad(values, (n - 1, 0)), n)


def _scan_levels(log_decay: torch.Tensor, steps: int) -> tuple[ScanLevel, ...]:
    levels = []
    while True:
        powers = torch.exp(torch.arange(_GROUP, device=log_decay.device, dtype=log_decay.dtype)
                           * log_decay.unsqueeze(-1))  # r^0 .. r^(G-1), (D, N, G)
        # [c', c] = r^(c - 1 - c') above the diagonal: the Toeplitz matrix of (0, r^0, .., r^(size-2)). Traced by
        # torch.compile it is G x G also where fewer steps are left (the scan pads them), so that every sequence
        # length with as many levels has the same graph, not one per 64-token band
        size = _GROUP if torch.compiler.is_compiling() else min(steps, _GROUP)
        matrix = _upper_toeplitz(F.pad(powers[..., :size - 1], (1, 0)))
        if steps <= _GROUP:
            levels.append(ScanLevel(matrix, None))
            return tuple(levels)
        levels.append(ScanLevel(matrix, powers))
        log_decay = log_decay * _GROUP
        steps = -(-steps // _GROUP)


def causal_part(weight: torch.Tensor, q: torch.Tensor, out: torch.Tensor, chunk: int, chunks: int,
                track_levels: bool = True, residual: Optional[torch.Tensor] = None) -> Part:
    """A causal EMA with input weights `weight`, decays `q` and output weights `out`, each (D, N), over `chunks`
    chunks of `chunk` tokens: kernel[l] = sum_n c q^l for l < T, to_state[n, j] = q^(T-1-j),
    from_state[n, i] = c q^(i+1), c = weight * out. `residual` (D,): omega, added to lag 0 (y + omega * u).
    `track_levels=False`: the scan's powers without autograd (the hand-written backward differentiates through
    log_decay itself)."""
    log_q = torch.log(q).unsqueeze(-1)
    powers = torch.exp(torch.arange(chunk + 1, device=q.device, dtype=q.dtype) * log_q)  # q^0 .. q^T, (D, N, T+1)
    c = weight * out
    kernel = torch.bmm(c.unsqueeze(1), powers[..., :chunk]).squeeze(1)  # k[0 .. T-1], (D, T)
    if residual is not None:
        kernel = kernel + F.pad(residual.unsqueeze(-1), (0, chunk - 1))
    log_decay = log_q.squeeze(-1) * chunk
    with torch.set_grad_enabled(track_levels and torch.is_grad_enabled()):
        levels = _scan_levels(log_decay, chunks) if chunks > 1 else ()
    return Part(kernel, powers[..., :chunk].flip(-1), c.unsqueeze(-1) * powers[..., 1:], log_decay, levels, False)


def turned(part: Part) -> Part:
    """The EMA with the same kernel in the other direction (time reversed within each chunk and across chunks):
    the transposed convolution."""
    return part._replace(to_state=part.to_state.flip(-1),
                         from_state=part.from_state.flip(-1), reverse=not part.reverse)


def _scan(s: torch.Tensor, levels: Sequence[ScanLevel], reverse: bool) -> torch.Tensor:
    """The state entering each chunk: h[c] = sum_{c' < c} r^(c - 1 - c') s[c'] (with `reverse`, the sum over
    c' > c of r^(c' - 1 - c) s[c']) along the last dim of s (D, N, R, C). Up to _GROUP chunks, one product with
    the level's matrix; beyond, each group of _GROUP chunks so, then the states between groups by the same scan
    over the groups (decay r^_GROUP), carried into each group's chunks."""
    matrix, powers = levels[0]
    if reverse:
        matrix = matrix.transpose(-1, -2)
    dim, n, rows, steps = s.shape
    if powers is None:  # the last level, at most _GROUP steps
        if torch.compiler.is_compiling():  # padded to the whole matrix: one graph for any number of steps
            return torch.matmul(_padded(s, _GROUP), matrix)[..., :steps]
        return torch.matmul(s, matrix)
    groups = -(-steps // _GROUP)
    s = _padded(s, groups * _GROUP)  # zeros after the end: no state for an earlier chunk
    s = s.reshape(dim, n, rows * groups, _GROUP)
    local = torch.matmul(s, matrix)
    # what each group hands on: its chunks decayed to its far end (r^(G-1-i), or r^i in reverse)
    leaving = torch.matmul(s, (powers if reverse else powers.flip(-1)).unsqueeze(-1))
    entering = _scan(leaving.view(dim, n, rows, groups), levels[1:], reverse)
    carried = powers.flip(-1) if reverse else powers  # decay from the group's near edge
    out = torch.addcmul(local.view(dim, n, rows, groups, _GROUP), entering.unsqueeze(-1),
                        carried.view(dim, n, 1, 1, _GROUP))
    return out.view(dim, n, rows, groups * _GROUP)[..., :steps]


def _states(x: torch.Tensor, part: Part, batch: int) -> torch.Tensor:
    """The state entering each chunk, (D, N, B*C), for chunk rows x (D, B*C, T)."""
    s = torch.bmm(part.to_state, x.transpose(1, 2))  # each chunk's own contribution, (D, N, B*C)
    dim, n, rows = s.shape
    h = _scan(s.view(dim, n, batch, rows // batch), part.levels, part.reverse)
    if torch.compiler.is_compiling():
        # a copy whatever the length: reshape copies unless the scan's padding was empty, and that test would be
        # a guard on the length (a graph per side)
        h = h.clone(memory_format=torch.contiguous_format)
    return h.reshape(dim, n, rows)


def _to_chunks(u: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, L, D) -> (D, B*C, T): one transposing copy, zero-padded to whole chunks (padding at the end changes
    no causal output, and contributes nothing anti-causally)."""
    batch, length, dim = u.shape
    chunks = -(-length // chunk)
    return _padded(u.permute(2, 0, 1), chunks * chunk).view(dim, batch * chunks, chunk)


def _from_chunks(y: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(D, B*C, T) -> (B, L, D), a transposed view."""
    return y.view(y.shape[0], batch, -1)[..., :length].permute(1, 2, 0)


def _parts(coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bidirectional: bool, chunk: int,
           chunks: int, track_levels: bool = True, residual: Optional[torch.Tensor] = None) -> list[Part]:
    weight, q, out = coefficients
    if not bidirectional:
        return [causal_part(weight, q, out, chunk, chunks, track_levels, residual)]
    dim = weight.shape[0] // 2
    return [causal_part(weight[:dim], q[:dim], out[:dim], chunk, chunks, track_levels, residual),
            turned(causal_part(weight[dim:], q[dim:], out[dim:], chunk, chunks, track_levels))]


def _intra(parts: Sequence[Part]) -> torch.Tensor:
    """The within-chunk matrix of all directions at once, (D, T, T), x @ intra: [j, i] = the kernel at lag i - j,
    the causal direction's above the diagonal, the anti-causal one's below, lag 0 the sum of both. They multiply
    the same rows, so one Toeplitz matrix from the two-sided kernel does for both (one copy, no sum of two)."""
    causal = [p.kernel for p in parts if not p.reverse]
    anti = [p.kernel.flip(-1) for p in parts if p.reverse]  # lags T-1 .. 0
    chunk = parts[0].kernel.shape[-1]
    if not anti:
        return _upper_toeplitz(causal[0])
    if not causal:
        lags = F.pad(anti[0], (0, chunk - 1))
    else:
        lags = torch.cat([anti[0][:, :-1], anti[0][:, -1:] + causal[0][:, :1], causal[0][:, 1:]], -1)
    return _toeplitz(lags, chunk)


def _convolve(x: torch.Tensor, parts: Sequence[Part], batch: int) -> torch.Tensor:
    """The convolution of chunk rows x (D, B*C, T) by the EMA's directions, (D, B*C, T)."""
    y = torch.bmm(x, _intra(parts))
    for part in parts:
        if part.levels:  # more than one chunk: the states carry between them
            y = torch.baddbmm(y, _states(x, part, batch).transpose(1, 2), part.from_state)
    return y


def _build_parts(coefficients: Callable, bidirectional: bool, chunk: int, chunks: int, has_residual: bool,
                 dtype: torch.dtype, *params: torch.Tensor, track_levels: bool = True) -> list[Part]:
    """The parts from the parameters: coefficients(*kernel parameters), and the residual weight last if any."""
    residual = params[-1].to(dtype) if has_residual else None
    kernel_params = params[:-1] if has_residual else params
    return _parts(coefficients(*kernel_params), bidirectional, chunk, chunks, track_levels, residual)


class _ChunkedEma(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, chunk: int, bidirectional: bool, coefficients: Callable, has_residual: bool,
                *params):
        batch, length, _ = u.shape
        ctx.build = functools.partial(_build_parts, coefficients, bidirectional, chunk, -(-length // chunk),
                                      has_residual, u.dtype)
        ctx.save_for_backward(u, *params)
        ctx.chunk = chunk
        ctx.autocast = autocast_state(u.device.type)
        with torch.no_grad(), torch.autocast(u.device.type, enabled=False):  # the products in u's dtype
            parts = ctx.build(*params)
            return _from_chunks(_convolve(_to_chunks(u, chunk), parts, batch), batch, length)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # a backward called inside an autocast region would run these products in bfloat16: they stay in u's dtype
        with torch.autocast(grad.device.type, enabled=False):
            return _ChunkedEma._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        u, *params = ctx.saved_tensors
        batch, length = u.shape[0], u.shape[1]
        needs = ctx.needs_input_grad[5:]
        need_u, need_params = ctx.needs_input_grad[0], any(needs)
        # the matrices again, from fresh leaves of the parameters: their graph carries gradients to them
        parts, leaves = replay(functools.partial(ctx.build, track_levels=False), params, needs, ctx.autocast)
        gy = _to_chunks(grad, ctx.chunk)  # (D, B*C, T)
        x = _to_chunks(u, ctx.chunk) if need_params else None
        # y = x @ intra + h^T @ from_state, h = scan(to_state @ x^T): each product's gradients by hand
        with torch.set_grad_enabled(need_params):
            intra = _intra(parts)
        grad_x = torch.bmm(gy, intra.detach().transpose(1, 2)) if need_u else None
        outputs, output_grads = [], []
        if need_params:
            outputs.append(intra)
            output_grads.append(torch.bmm(x.transpose(1, 2), gy))
        for part in parts:
            to_state, from_state = part.to_state.detach(), part.from_state.detach()
            if part.levels:
                grad_h = torch.bmm(from_state, gy.transpose(1, 2))  # (D, N, B*C)
                dim, n, rows = grad_h.shape
                # the scan's transpose is the scan the other way
                grad_s = _scan(grad_h.view(dim, n, batch, -1), part.levels, not part.reverse).reshape(dim, n, rows)
                if need_u:
                    grad_x = torch.baddbmm(grad_x, grad_s.transpose(1, 2), to_state)
            if need_params and part.levels:
                h = _states(x, part, batch)
                # h[c] = r h[c-1] + s[c-1]: dL/dr = sum over chunks of dL/ds[c] h[c], either direction
                grad_log_decay = torch.linalg.vecdot(grad_s, h).mul_(torch.exp(part.log_decay.detach()))
                outputs += [part.from_state, part.to_state, part.log_decay]
                output_grads += [torch.bmm(h, gy), torch.bmm(grad_s, x), grad_log_decay]
        grads = [None] * len(params)
        if need_params:
            wanted = [leaf for leaf, need in zip(leaves, needs) if need]
            found = iter(torch.autograd.grad(outputs, wanted, output_grads, allow_unused=True))
            grads = [next(found) if need else None for need in needs]
        grad_u = _from_chunks(grad_x, batch, length) if need_u else None
        return grad_u, None, None, None, None, *grads


def chunked_ema(u: torch.Tensor, coefficients: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                params: Sequence[torch.Tensor], bidirectional: bool = False, chunk: int = CHUNK,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The EMA's convolution of u (B, L, D), as a transposed (B, L, D) view: causal, or with `bidirectional` the
    causal one of the first D rows of the coefficients plus the anti-causal one of the other D (both with their
    lag 0). `coefficients(*params)` gives (input weight p*beta, decay q, output weight), each (D or 2D, N); it is
    called again in backward, with autograd, and must give the same values. `residual` (D,): plus residual * u,
    as part of lag 0 (no pass of its own, forward or backward). Keeps u, params and residual for backward."""
    extra = () if residual is None else (residual,)
    return _ChunkedEma.apply(u, chunk_length(u.shape[1], chunk), bidirectional, coefficients, residual is not None,
                             *params, *extra)


def chunked_ema_plain(u: torch.Tensor, coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      bidirectional: bool = False, chunk: int = CHUNK, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """`chunked_ema` by plain differentiable ops: for torch.compile to trace, and for passes without autograd."""
    batch, length, _ = u.shape
    chunk = chunk_length(length, chunk)
    parts = _parts(coefficients, bidirectional, chunk, -(-length // chunk),
                   residual=None if residual is None else residual.to(u.dtype))
    return _from_chunks(_convolve(_to_chunks(u, chunk), parts, batch), batch, length)


def chunked_ema_with_state(u: torch.Tensor, coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                           state: Optional[torch.Tensor], chunk: int = CHUNK, residual: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal EMA of u (B, L, D) continuing from `state` (B, D, N) (None: from rest), and its state after the
    last token: the prefill of cached decoding. By the same chunked products, so nothing of L x N per channel is
    built (the powers q^0 .. q^L would be (D, N, L) floats: 4 GiB at 64k tokens and the GPU anchor's widths).
    `residual` (D,): plus residual * u, as `chunked_ema_plain` adds it. From rest, y is `chunked_ema_plain`'s to
    the bit (the same operations). Plain differentiable ops. Returns (y as a transposed (B, L, D) view, the new
    state (B, D, N))."""
    weight, q, out = coefficients
    batch, length, dim = u.shape
    n = q.shape[1]
    chunk = chunk_length(length, chunk)
    chunks = -(-length // chunk)
    part = causal_part(weight, q, out, chunk, chunks, residual=None if residual is None else residual.to(u.dtype))
    x = _to_chunks(u, chunk)
    y = torch.bmm(x, _intra([part]))
    log_q = torch.log(q).unsqueeze(-1)
    tail = length - (chunks - 1) * chunk  # tokens in the last chunk
    # the last chunk's tokens decayed to its last token, sum_j q^(tail-1-j) u[j] (zero weight for the padding)
    gap = tail - 1 - torch.arange(chunk, device=u.device)
    to_end = torch.where(gap >= 0, torch.exp(gap.clamp(min=0).to(u.dtype) * log_q), 0.0)  # (D, N, T)
    final = torch.bmm(to_end, x.view(dim, batch, chunks, chunk)[:, :, -1].transpose(1, 2))  # (D, N, B)
    if chunks > 1:
        h = _states(x, part, batch)
        y = torch.baddbmm(y, h.transpose(1, 2), part.from_state)
        final = final + torch.exp(tail * log_q) * h.view(dim, n, batch, chunks)[..., -1]
    new_state = (weight.unsqueeze(-1) * final).permute(2, 0, 1)
    if state is not None:
        state = state.to(u.dtype)
        # the old state decays into every new output, y[cT + i] += sum_n out q^(i+1) r^c state: per chunk, one more
        # product with (N x T) powers
        entering = torch.exp(torch.arange(chunks, device=u.device, dtype=u.dtype) * part.log_decay.unsqueeze(-1))
        decayed = state.permute(1, 2, 0).unsqueeze(-1) * entering.unsqueeze(2)  # (D, N, B, C)
        into = out.unsqueeze(-1) * torch.exp(torch.arange(1, chunk + 1, device=u.device, dtype=u.dtype) * log_q)
        y = torch.baddbmm(y, decayed.reshape(dim, n, batch * chunks).transpose(1, 2), into)
        new_state = new_state + torch.exp(length * log_q.squeeze(-1)) * state
    return _from_chunks(y, batch, length), new_state
