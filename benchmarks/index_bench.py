"""Sample-index builds: the GPT index written into its memory-mapped cache files against the same build in memory
and then saved (what the cache did before), and the blend walk compiled by numba against the same walk in Python.

Each GPT run is its own process (peak memory is per process), alternating A B A B because these machines are
noisy; the figures are the build's seconds and its peak anonymous memory (RssAnon: what the kernel cannot write
back to a file under pressure) above the process's own before the build. Both builds' arrays are checked equal.

    .venv/bin/python benchmarks/index_bench.py --documents 5000000 --samples 20000000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import hashlib, json, os, sys, threading, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from megatron_mega.data.gpt_dataset import build_gpt_indices
from megatron_mega.data.index_cache import IndexCache, in_memory

mode, documents, samples, seq_len, cache_dir = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), \
    sys.argv[6]
lengths = (np.random.default_rng(0).geometric(1 / 500, documents) + 1).astype(np.int32)

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak = [anon_kb()]
base = peak[0]
def poll():
    while True:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.01)
threading.Thread(target=poll, daemon=True).start()
cache = IndexCache(cache_dir)
start = time.perf_counter()
if mode == "mapped":
    build = lambda allocate: build_gpt_indices(lengths, 0, seq_len, samples, 1, 2, allocate)
else:  # built in memory, then saved: the cache's way before builders got `allocate`
    arrays = {}
    def build(allocate):
        arrays.update(build_gpt_indices(lengths, 0, seq_len, samples, 1, 2, in_memory))
        return arrays
entry = cache.load_or_build("gpt", {"mode": mode}, build)
seconds = time.perf_counter() - start
peak[0] = max(peak[0], anon_kb())
digest = hashlib.sha256()
for name in sorted(entry.arrays):
    array = entry.arrays[name]
    for lo in range(0, len(array), 1 << 24):
        digest.update(np.ascontiguousarray(array[lo:lo + (1 << 24)]).tobytes())
print(json.dumps({"seconds": seconds, "peak_anon_mb": (peak[0] - base) / 1e3, "digest": digest.hexdigest(),
                  "bytes": sum(a.nbytes for a in entry.arrays.values())}))
"""


def gpt_run(mode: str, args, tmp: str) -> dict:
    cache = tempfile.mkdtemp(dir=tmp)
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), mode, str(args.documents), str(args.samples),
                           str(args.seq_len), cache], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def blend_walk(datasets: int, size: int, repeats: int) -> dict:
    import numpy as np

    from megatron_mega.data import blended

    weights = list(np.random.default_rng(1).random(datasets) + 0.1)
    compiled = blended._compiled_walk()
    blended.build_blending_indices(weights, 10)  # compiled (or loaded from numba's cache) before timing
    times: dict[str, list[float]] = {"compiled": [], "python": []}
    python_size = max(1, size // 100)  # uncompiled it is 100x+ slower: time a hundredth of the samples
    for _ in range(repeats):
        for name, walk, n in (("compiled", compiled, size), ("python", blended._tijdeman_walk, python_size)):
            original = blended._compiled_walk
            blended._compiled_walk = lambda walk=walk: walk  # type: ignore[assignment]
            try:
                start = time.perf_counter()
                blended.build_blending_indices(weights, n)
                times[name].append((time.perf_counter() - start) / n * 1e9)
            finally:
                blended._compiled_walk = original
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=5_000_000)
    parser.add_argument("--samples", type=int, default=20_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blend-samples", type=int, default=10_000_000)
    parser.add_argument("--blend-datasets", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    results: dict = {"gpt": {"documents": args.documents, "samples": args.samples, "seq_len": args.seq_len}}
    runs: dict[str, list[dict]] = {"mapped": [], "in_memory": []}
    with tempfile.TemporaryDirectory(prefix="index_bench_") as tmp:
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(gpt_run(mode, args, tmp))
    digests = {run["digest"] for mode in runs for run in runs[mode]}
    assert len(digests) == 1, "the two builds gave different indices"
    print(f"GPT index, {args.documents:,} documents -> {args.samples:,} samples of {args.seq_len} "
          f"({runs['mapped'][0]['bytes'] / 1e6:,.0f} MB of indices), median of {args.repeats}:")
    for mode, label in (("in_memory", "in memory, then saved"), ("mapped", "into memory-mapped files")):
        seconds = statistics.median(r["seconds"] for r in runs[mode])
        anon = statistics.median(r["peak_anon_mb"] for r in runs[mode])
        results["gpt"][mode] = {"seconds": seconds, "peak_anon_mb": anon}
        print(f"  {label:26s} {seconds:6.1f} s   peak anonymous memory {anon:8,.0f} MB")
    gpt = results["gpt"]
    print(f"  mapped / in memory: time {gpt['mapped']['seconds'] / gpt['in_memory']['seconds']:.2f}x, memory "
          f"{gpt['mapped']['peak_anon_mb'] / max(gpt['in_memory']['peak_anon_mb'], 1e-9):.2f}x")
    results["blend"] = {}
    for k in args.blend_datasets:
        walk = blend_walk(k, args.blend_samples, args.repeats)
        results["blend"][k] = walk
        print(f"blend walk, {k} datasets: compiled {walk['compiled']:.1f} ns/sample, uncompiled (the fallback "
              f"without numba) {walk['python']:.0f} ns/sample ({walk['python'] / walk['compiled']:.0f}x); a billion "
              f"samples: {walk['compiled']:.0f} s compiled, {walk['python'] / 60:.0f} min uncompiled")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
