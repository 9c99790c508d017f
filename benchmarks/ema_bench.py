"""The EMA's full-sequence convolution, forward and backward, by the chunked recurrence (model/chunked_ema.py, what
the model runs) against the FFT convolution it replaced (model/fft_conv.py), measured alternately in one process.

    .venv/bin/python benchmarks/ema_bench.py                              # CPU anchor widths: D=256, N=16
    python3 benchmarks/ema_bench.py --device cuda --hidden 1024 --shapes 4x4096 1x16384 1x262144
                                                                          # the GPU anchor's EMA (gpu_check.sh)

Each case builds one EMA layer (float32, as the model computes it under autocast), then times rounds of
[chunked, FFT] forward + backward with the gradients of the input and the four kernel parameters, alternating so
that a noisy machine slows both alike; the median of each is reported, with their ratio and, on CUDA, the peak
memory of each. The two are checked to agree first (values to 1e-4 of their scale).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_mega import MegaConfig
from megatron_mega.model.ema import MegaMultiDimensionDampedEma


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(ema: MegaMultiDimensionDampedEma, u: torch.Tensor, grad: torch.Tensor, fft: bool) -> torch.Tensor:
    ema.zero_grad(set_to_none=True)
    leaf = u.detach().requires_grad_()
    y = ema._fft_convolve(leaf, leaf.shape[1]) if fft else ema._convolve(leaf)
    y.backward(grad)
    return y.detach()


def measure(batch: int, length: int, hidden: int, ndim: int, bidirectional: bool, device: torch.device,
            rounds: int) -> dict:
    torch.manual_seed(0)
    config = MegaConfig(hidden_size=hidden, ema_projection_size=ndim, bidirectional=bidirectional,
                        is_decoder=not bidirectional)
    ema = MegaMultiDimensionDampedEma(config).to(device)
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_(0.0, 0.5)
    u = torch.randn(batch, length, hidden, device=device)
    grad = torch.randn(batch, length, hidden, device=device)
    chunked, fft = _step(ema, u, grad, False), _step(ema, u, grad, True)  # warm-up, and the check
    error = float((chunked - fft).abs().max() / fft.abs().max())
    if error > 1e-4:
        raise SystemExit(f"chunked and FFT EMA disagree at {batch}x{length}: max error {error:.2e} of the scale")
    times = {"chunked": [], "fft": []}
    peaks = {"chunked": float("nan"), "fft": float("nan")}
    for _ in range(rounds):
        for name in times:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            started = time.perf_counter()
            _step(ema, u, grad, name == "fft")
            _sync(device)
            times[name].append(time.perf_counter() - started)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    chunked_ms, fft_ms = (1000 * statistics.median(times[name]) for name in ("chunked", "fft"))
    return {"shape": f"{batch}x{length}", "chunked_ms": chunked_ms, "fft_ms": fft_ms, "speedup": fft_ms / chunked_ms,
            "chunked_gib": peaks["chunked"], "fft_gib": peaks["fft"], "max_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x1024", "4x4096"], help="BATCHxLENGTH")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ndim", type=int, default=16, help="the EMA's N")
    parser.add_argument("--bidirectional", action="store_true", help="an encoder's EMA (default: causal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind = "bidirectional" if args.bidirectional else "causal"
    print(f"EMA forward + backward, {kind}, D={args.hidden}, N={args.ndim}, float32, {device}, median of "
          f"{args.rounds} alternating rounds")
    print(f"{'shape':>10} {'chunked ms':>11} {'FFT ms':>9} {'speedup':>8} {'chunked GiB':>12} {'FFT GiB':>8}")
    for shape in args.shapes:
        batch, length = (int(v) for v in shape.lower().split("x"))
        row = measure(batch, length, args.hidden, args.ndim, args.bidirectional, device, args.rounds)
        print(f"{row['shape']:>10} {row['chunked_ms']:11.2f} {row['fft_ms']:9.2f} {row['speedup']:7.2f}x "
              f"{row['chunked_gib']:12.2f} {row['fft_gib']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
