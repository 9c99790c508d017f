"""Per-token latency of cached greedy decoding against context length (MEGA's promise: flat with chunking).

    .venv/bin/python benchmarks/decode_bench.py                       # contexts 1k, 8k, 64k; chunk 1024
    .venv/bin/python benchmarks/decode_bench.py --contexts 1024 8192 --steps 64 --chunk 0   # unchunked, for contrast
    python3 benchmarks/decode_bench.py --device cuda --dtype bf16 --hidden 1024 --layers 16 --nffn 2048 --bias rotary
                                                                      # the GPU anchor widths (241M), on one GPU

A causal MegaForCausalLM (default: the CPU anchor widths, H=256, 4 layers, z=64, v=512, N=16, vocab 32000) prefills
a random context with the cache, then takes `--steps` single-token steps; the median step time is the per-token
latency. With chunking a step attends to the open chunk only and the EMA carries the rest in a (B, D, N) state, so
the latency must not grow with the context; without chunking it attends to the whole context and grows linearly.

Each context is measured with every `--modes` entry in turn: `dynamic` (the cache of model/cache.py that grows
by concatenation), `static` (the fixed-size buffers of MegaStaticCache, eager) and, on CUDA, `graph` (the static step
replayed as one CUDA graph, model/decode_graph.py): the same tokens, told apart by how a step is launched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_mega import MegaConfig, MegaForCausalLM
from megatron_mega.model.cache import MegaStaticCache, static_cache_size
from megatron_mega.model.decode_graph import CudaGraphStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: MegaForCausalLM, context: int, steps: int, mode: str = "dynamic", seed: int = 0) -> dict:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        _sync(device)
        started = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - started
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        cached_keys = cache[0].key.shape[1]
        graph = None
        if mode != "dynamic":
            cache = MegaStaticCache.from_cache(cache, static_cache_size(model.config, context + steps))
            if mode == "graph":
                graph = CudaGraphStep(model, cache, batch=1)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            if graph is not None:
                token = graph.step(token).argmax(-1)
            else:
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)  # the step is done when its token is known
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"context": context, "mode": mode, "prefill_s": prefill, "ms_per_token": 1000 * statistics.median(times),
            "cached_keys": cached_keys, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 65536])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=1024, help="chunk size; 0 = no chunking")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nffn", type=int, default=None, help="NFFN width (default: --hidden)")
    parser.add_argument("--bias", default="simple", choices=("simple", "rotary"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--modes", nargs="+", choices=("dynamic", "static", "graph"),
                        help="how a step runs (default: dynamic and static, and graph on CUDA)")
    args = parser.parse_args()
    modes = args.modes or ["dynamic", "static"] + (["graph"] if args.device.startswith("cuda") else [])
    torch.set_num_threads(args.threads)
    config = MegaConfig(vocab_size=32000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        intermediate_size=2 * args.hidden, nffn_hidden_size=args.nffn or args.hidden,
                        relative_positional_bias=args.bias,
                        shared_representation_size=args.hidden // 4, ema_projection_size=16,
                        max_positions=max(args.contexts) + args.steps, is_decoder=True, bidirectional=False,
                        use_chunking=args.chunk > 0, chunk_size=args.chunk if args.chunk > 0 else -1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    with device:
        model = MegaForCausalLM(config).eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    print(f"decode_bench: H={args.hidden} layers={args.layers} chunk={args.chunk or 'none'} bias={args.bias} "
          f"device={device} dtype={args.dtype} threads={args.threads}")
    print(f"{'context':>8} {'mode':>8} {'prefill s':>10} {'ms/token':>9} {'keys cached':>12} {'peak GiB':>9}")
    for context in args.contexts:
        for mode in modes:
            row = measure(model, context, args.steps, mode)
            print(f"{row['context']:8d} {mode:>8} {row['prefill_s']:10.2f} {row['ms_per_token']:9.2f} "
                  f"{row['cached_keys']:12d} {row['peak_gib']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
