"""The EMA against its definition: an explicit float64 recurrence over time."""

import pytest
import torch

from megatron_mega.model.config import MegaConfig
from megatron_mega.model.ema import MegaMultiDimensionDampedEma
from megatron_mega.model.mega_model import MegaModel
from tests.helpers import tiny_config


def make_ema(bidirectional: bool, truncation=None, dtype=torch.float64) -> MegaMultiDimensionDampedEma:
    config = tiny_config(bidirectional=bidirectional, truncation=truncation)
    ema = MegaMultiDimensionDampedEma(config)
    MegaModel(config)._init_weights(ema)
    return ema.to(dtype)


def recurrence(ema: MegaMultiDimensionDampedEma, x: torch.Tensor, reverse_half: bool = False,
               truncation=None) -> torch.Tensor:
    """y[t] = sum_n eta h[t, n] / sqrt(N), h[t] = p beta x[t] + q h[t-1]; direct sums when truncated."""
    dim = x.shape[-1]
    rows = slice(dim, 2 * dim) if reverse_half else slice(0, dim)
    p = torch.sigmoid(ema.damping_factor[rows, :, 0].double())
    q = 1 - p * torch.sigmoid(ema.decay_factor[rows, :, 0].double())
    weight = p * ema.ema_expansion_matrix[rows, :, 0].double()
    out = ema.kernel_projection_matrix[rows].double() * ema.scale
    x = x.double().flip(1) if reverse_half else x.double()
    batch, length, _ = x.shape
    y = torch.zeros(batch, length, dim, dtype=torch.float64)
    if truncation is None:
        h = torch.zeros(batch, dim, weight.shape[1], dtype=torch.float64)
        for t in range(length):
            h = weight * x[:, t, :, None] + q * h
            y[:, t] = (h * out).sum(-1)
    else:
        for t in range(length):
            for s in range(max(0, t - truncation + 1), t + 1):
                y[:, t] += ((weight * q ** (t - s)) * out).sum(-1) * x[:, s]
    return y.flip(1) if reverse_half else y


def expected(ema, x, mask=None, truncation=None):
    u = x if mask is None else x * mask[..., None]
    y = recurrence(ema, u, truncation=truncation)
    if ema.bidirectional:
        # the backward EMA runs over the reversed sequence; both directions count lag 0, as fairseq's MEGA does
        y = y + recurrence(ema, u, reverse_half=True, truncation=truncation)
    return torch.nn.functional.silu(y + x.double() * ema.residual_weight.double())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [1, 7, 32])
def test_fft_equals_recurrence(bidirectional, length):
    ema = make_ema(bidirectional)
    x = torch.randn(2, length, 32, dtype=torch.float64)
    out, state = ema(x)
    assert state is None
    torch.testing.assert_close(out, expected(ema, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_truncation(bidirectional):
    ema = make_ema(bidirectional, truncation=5)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    out, _ = ema(x)
    torch.testing.assert_close(out, expected(ema, x, truncation=5), rtol=1e-10, atol=1e-10)


def test_padding_is_zeroed_before_smoothing():
    ema = make_ema(False)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :4] = False
    out, _ = ema(x, mask)
    torch.testing.assert_close(out, expected(ema, x, mask.double()), rtol=1e-10, atol=1e-10)


def test_recurrent_path_continues_exactly():
    """Prefill 9 tokens returning the state, then 1-token steps, then a 6-token chunk from a state."""
    ema = make_ema(False)
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    full, _ = ema(x)
    pieces, state = [], None
    for start, stop in [(0, 9), (9, 10), (10, 11), (11, 17), (17, 18), (18, 20)]:
        out, state = ema(x[:, start:stop], state=state, return_state=True)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)


def test_state_path_refuses_what_has_no_state():
    with pytest.raises(RuntimeError, match="bidirectional"):
        make_ema(True)(torch.randn(1, 3, 32, dtype=torch.float64), return_state=True)
    with pytest.raises(RuntimeError, match="truncation"):
        make_ema(False, truncation=4)(torch.randn(1, 3, 32, dtype=torch.float64), return_state=True)


def test_half_precision_input_is_smoothed_in_float32():
    ema = make_ema(False, dtype=torch.float32)
    x = torch.randn(2, 16, 32)
    ref, _ = ema(x)
    out, _ = ema.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_ema_ignores_autocast(bidirectional):
    """Under bfloat16 autocast the kernel's matmul would round q^l to 3 digits; the EMA keeps its own precision,
    so its output under autocast is the float32 output, bit for bit."""
    torch.manual_seed(0)
    config = MegaConfig(hidden_size=16, ema_projection_size=4, bidirectional=bidirectional,
                        is_decoder=not bidirectional)
    ema = MegaMultiDimensionDampedEma(config)
    for p in ema.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 300, 16)
    expected, _ = ema(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ema(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
