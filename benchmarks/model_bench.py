"""Training-step benchmark of MegaForMaskedLM: ours (megatron_mega) against transformers 4.57.6, on CPU.

What is measured: one training step = forward + loss + backward (no optimizer step; gradients are reset to None
before every step), float32, train mode (default dropouts), 2 intra-op threads, at the anchor config

    hidden_size=256, num_hidden_layers=4, ema_projection_size=16, intermediate_size=512 (v),
    shared_representation_size=64 (z), nffn_hidden_size=256, vocab_size=32000, bidirectional=True, is_decoder=False

on the cases (batch x seq, chunking):

    4x1024          batch 4, seq 1024, no chunking
    4x1024_c128     batch 4, seq 1024, use_chunking=True, chunk_size=128
    4x4096_c128     batch 4, seq 4096, use_chunking=True, chunk_size=128

Every measurement runs in a fresh worker process (so its peak RSS is its own), started with the interpreter of the
implementation's virtual environment: ours with .venv/bin/python, transformers with .venv-hf/bin/python. A worker
builds the model and the inputs, records its RSS ("base"), runs one warm-up step, then times K steps and reports
the median seconds/step (wall clock; also forward and backward apart, and the process CPU seconds per step, which
says how much of a slow step was waiting for a busy machine), tokens/s = batch*seq/median, its peak RSS (getrusage
ru_maxrss) and peak - base (the memory the step itself needs: the base holds the interpreter, torch, transformers and
the 32000-word embedding).

The parent alternates the implementations (ours, hf, ours, hf, ...) for R rounds per case so that noise on the
machine hits both alike, then prints one table per case, with the ratios
    speed  = hf s/step / ours s/step          (> 1: ours is faster)
    memory = ours peak / hf peak              (< 1: ours needs less), for both absolute peak and peak - base.
The s/step of an implementation is the median over all timed steps of all its rounds.

How to run (from the repository root; the parent itself needs only the standard library):

    .venv/bin/python benchmarks/model_bench.py                                  # all cases, 2 rounds, 2 steps
    .venv/bin/python benchmarks/model_bench.py --cases 4x1024_c128 --rounds 3 --steps 3 --json out.json
    .venv/bin/python benchmarks/model_bench.py --cases 4x4096_c128 --steps 1    # the big case (HF: ~1 min/step)
    .venv/bin/python benchmarks/model_bench.py --steps 3 --case-steps 4x4096_c128=2 --json bench.json  # ~20 min
    .venv/bin/python benchmarks/model_bench.py --impls ours --cases 4x1024_c128  # only one implementation

    # one worker by hand (prints one line "BENCH_RESULT {json}"):
    .venv/bin/python benchmarks/model_bench.py --worker --impl ours --case 4x1024_c128 --steps 2
    .venv-hf/bin/python benchmarks/model_bench.py --worker --impl hf --case 4x1024_c128 --steps 2

Options: --ours-python / --hf-python choose the interpreters, --threads the intra-op thread count (default 2),
--worker-timeout a limit per worker in seconds. The script exits non-zero with a message when an interpreter is
missing, when it cannot import its implementation (megatron_mega, or transformers with MegaForMaskedLM), or when a
worker fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_MARKER = "BENCH_RESULT "

ANCHOR = dict(
    hidden_size=256,
    num_hidden_layers=4,
    ema_projection_size=16,
    intermediate_size=512,
    shared_representation_size=64,
    nffn_hidden_size=256,
    vocab_size=32000,
    bidirectional=True,
    is_decoder=False,
)

# name -> (batch, seq_len, chunk_size or None)
CASES = {
    "4x1024": (4, 1024, None),
    "4x1024_c128": (4, 1024, 128),
    "4x4096_c128": (4, 4096, 128),
}

# transformers' figures measured earlier on this machine: s/step, peak RSS in GB (absolute)
HF_REFERENCE = {
    "4x1024": (16.0, 4.06),
    "4x1024_c128": (14.6, 3.90),
    "4x4096_c128": (55.7, 13.4),
}

IMPLS = ("ours", "hf")
MASK_FRACTION = 0.15  # labels: 15% of the positions carry a target, the rest are -100 (an MLM batch)


def config_kwargs(case: str) -> dict:
    batch, seq_len, chunk = CASES[case]
    kwargs = dict(ANCHOR, max_positions=max(2048, seq_len))
    if chunk is not None:
        kwargs.update(use_chunking=True, chunk_size=chunk)
    else:
        kwargs.update(use_chunking=False)
    return kwargs


# ====================================================================================================== worker side
def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _fail(message: str, code: int = 2) -> None:
    print(f"model_bench: error: {message}", file=sys.stderr)
    sys.exit(code)


def run_worker(impl: str, case: str, steps: int, threads: int) -> None:
    try:
        import torch
    except ImportError as err:
        _fail(f"{sys.executable} cannot import torch ({err})")
    torch.set_num_threads(threads)
    extra = {}
    if impl == "ours":
        # measure the checkout this script lives in (a worktree, say), not whichever copy the venv has installed
        sys.path.insert(0, str(REPO_ROOT))
        try:
            from megatron_mega import MegaConfig, MegaForMaskedLM
        except ImportError as err:
            _fail(f"{sys.executable} cannot import megatron_mega ({err}); install it (pip install -e .) in that venv")
    else:
        try:
            import transformers
            from transformers import MegaConfig, MegaForMaskedLM
        except ImportError as err:
            _fail(f"{sys.executable} cannot import transformers.MegaForMaskedLM ({err}); "
                  "it needs transformers<=4.57.6 (the last release with MEGA)")
        extra["transformers"] = transformers.__version__
        transformers.logging.set_verbosity_error()

    batch, seq_len, _ = CASES[case]
    torch.manual_seed(0)
    config = MegaConfig(**config_kwargs(case))
    model = MegaForMaskedLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(batch, seq_len, generator=generator) >= MASK_FRACTION] = -100
    base_rss = _rss_bytes()
    peak_before = _peak_rss_bytes()

    losses: list[float] = []

    def step() -> tuple[float, float, float, float]:
        model.zero_grad(set_to_none=True)
        cpu_start = time.process_time()
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=labels).loss
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        cpu = time.process_time() - cpu_start
        losses.append(loss.item())
        if not torch.isfinite(loss):
            _fail(f"{impl} {case}: non-finite loss {loss.item()}")
        return end - start, middle - start, end - middle, cpu

    warm = step()
    timings = [step() for _ in range(steps)]
    totals = [t[0] for t in timings]
    median = statistics.median(totals)
    result = dict(
        impl=impl, case=case, batch=batch, seq_len=seq_len, chunk_size=CASES[case][2], steps=steps,
        threads=torch.get_num_threads(), torch=torch.__version__, python=sys.executable, n_params=n_params,
        warmup_s=warm[0], step_s=totals, forward_s=[t[1] for t in timings], backward_s=[t[2] for t in timings],
        cpu_s=[t[3] for t in timings], losses=losses,
        median_s=median, tokens_per_s=batch * seq_len / median,
        base_rss=base_rss, peak_rss_before_steps=peak_before, peak_rss=_peak_rss_bytes(), **extra,
    )
    result["step_rss"] = result["peak_rss"] - base_rss
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ====================================================================================================== parent side
def _check_interpreter(impl: str, python: str) -> None:
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        _fail(f"the interpreter for '{impl}' is missing: {python} (set --{impl}-python)")
    probe = ("import torch, megatron_mega; from megatron_mega import MegaForMaskedLM" if impl == "ours" else
             "import torch, transformers; from transformers import MegaForMaskedLM, MegaConfig")
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        what = "megatron_mega" if impl == "ours" else "transformers (with MegaForMaskedLM, i.e. <= 4.57.6)"
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        _fail(f"{python} cannot import {what}: {last}")


def _launch(impl: str, python: str, case: str, steps: int, threads: int, timeout: float) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--case", case,
           "--steps", str(steps), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        _fail(f"worker {impl} {case} ran past --worker-timeout {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = time.perf_counter() - start
            return result
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    _fail(f"worker {impl} {case} failed (exit {proc.returncode}): {' '.join(cmd)}")
    raise AssertionError  # unreachable


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _summary(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["step_s"]]
    median = statistics.median(steps)
    first = runs[0]
    return dict(
        median_s=median, tokens_per_s=first["batch"] * first["seq_len"] / median,
        min_s=min(steps), max_s=max(steps), n_steps=len(steps),
        forward_s=statistics.median([s for r in runs for s in r["forward_s"]]),
        backward_s=statistics.median([s for r in runs for s in r["backward_s"]]),
        cpu_s=statistics.median([s for r in runs for s in r["cpu_s"]]),
        peak_rss=max(r["peak_rss"] for r in runs), base_rss=statistics.median([r["base_rss"] for r in runs]),
        step_rss=max(r["step_rss"] for r in runs), round_medians=[r["median_s"] for r in runs],
    )


def _print_table(case: str, summaries: dict) -> None:
    batch, seq_len, chunk = CASES[case]
    print(f"\n=== {case}: batch {batch} x seq {seq_len}, "
          f"{'chunk ' + str(chunk) if chunk else 'unchunked'} (fwd+bwd, float32, train mode) ===")
    header = (f"{'impl':<6}{'s/step':>9}{'(min-max)':>16}{'fwd s':>8}{'bwd s':>8}{'cpu s':>8}{'tokens/s':>10}"
              f"{'peak GB':>9}{'base GB':>9}{'peak-base GB':>14}  rounds s/step")
    print(header)
    print("-" * len(header))
    for impl in IMPLS:
        s = summaries.get(impl)
        if s is None:
            continue
        rng = f"({s['min_s']:.2f}-{s['max_s']:.2f})"
        rounds = ", ".join(f"{m:.2f}" for m in s["round_medians"])
        print(f"{impl:<6}{s['median_s']:>9.3f}{rng:>16}{s['forward_s']:>8.2f}{s['backward_s']:>8.2f}{s['cpu_s']:>8.2f}"
              f"{s['tokens_per_s']:>10.0f}{_gb(s['peak_rss']):>9}{_gb(s['base_rss']):>9}{_gb(s['step_rss']):>14}"
              f"  {rounds}")
    if "ours" in summaries and "hf" in summaries:
        ours, hf = summaries["ours"], summaries["hf"]
        speed = hf["median_s"] / ours["median_s"]
        mem = ours["peak_rss"] / hf["peak_rss"]
        mem_step = ours["step_rss"] / hf["step_rss"]
        print(f"ratios: speed (hf s / ours s) = {speed:.2f}x [target >= 3]   "
              f"memory (ours / hf) peak = {mem:.3f}, peak-base = {mem_step:.3f} [target <= 0.5]")
    ref = HF_REFERENCE.get(case)
    if ref:
        print(f"earlier transformers reference: {ref[0]} s/step, {ref[1]} GB peak RSS")


def run_parent(args: argparse.Namespace) -> int:
    impls = [i for i in IMPLS if i in args.impls]
    pythons = {"ours": args.ours_python, "hf": args.hf_python}
    for impl in impls:
        _check_interpreter(impl, pythons[impl])
    print(f"model_bench: cases={args.cases} impls={impls} rounds={args.rounds} steps={args.steps} "
          f"case_steps={args.steps_for} "
          f"threads={args.threads} host={platform.node()} cpus={os.cpu_count()}")
    print("interpreters: " + ", ".join(f"{i}={pythons[i]}" for i in impls), flush=True)
    results: dict = {"config": ANCHOR, "rounds": args.rounds, "steps": args.steps, "case_steps": args.steps_for,
                     "threads": args.threads, "cases": {}}
    started = time.perf_counter()
    for case in args.cases:
        runs: dict[str, list[dict]] = {i: [] for i in impls}
        for round_index in range(args.rounds):
            # alternate which implementation goes first from round to round: A B, B A, A B, ...
            order = impls if round_index % 2 == 0 else impls[::-1]
            for impl in order:
                steps = args.steps_for.get(case, args.steps)
                r = _launch(impl, pythons[impl], case, steps, args.threads, args.worker_timeout)
                runs[impl].append(r)
                print(f"  [{time.perf_counter() - started:7.0f} s] {case} round {round_index + 1} {impl}: "
                      f"median {r['median_s']:.3f} s/step (steps {', '.join(f'{s:.2f}' for s in r['step_s'])}; "
                      f"warm-up {r['warmup_s']:.2f}), peak {_gb(r['peak_rss'])} GB, "
                      f"peak-base {_gb(r['step_rss'])} GB", flush=True)
        summaries = {impl: _summary(rs) for impl, rs in runs.items()}
        results["cases"][case] = {"runs": runs, "summary": summaries}
        if "ours" in summaries and "hf" in summaries:
            results["cases"][case]["ratios"] = dict(
                speed=summaries["hf"]["median_s"] / summaries["ours"]["median_s"],
                memory_peak=summaries["ours"]["peak_rss"] / summaries["hf"]["peak_rss"],
                memory_step=summaries["ours"]["step_rss"] / summaries["hf"]["step_rss"],
            )
        _print_table(case, summaries)
        if args.json:  # written after every case, so a long run keeps what it has measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations (default both)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours/hf workers per case (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per worker, after 1 warm-up (default 2)")
    parser.add_argument("--case-steps", nargs="+", default=[], metavar="CASE=K",
                        help="per-case override of --steps, e.g. 4x4096_c128=1")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", metavar="OUT", help="also write all results to this JSON file")
    parser.add_argument("--ours-python", default=str(REPO_ROOT / ".venv" / "bin" / "python"),
                        help="interpreter with megatron_mega installed (default .venv/bin/python)")
    parser.add_argument("--hf-python", default=str(REPO_ROOT / ".venv-hf" / "bin" / "python"),
                        help="interpreter with transformers 4.57.6 (default .venv-hf/bin/python)")
    parser.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds per worker (default 3600)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--rounds, --steps and --threads must be >= 1")
    args.steps_for = {}
    for item in args.case_steps:
        name, _, k = item.partition("=")
        if name not in CASES or not k.isdigit() or int(k) < 1:
            parser.error(f"--case-steps: expected CASE=K with CASE in {list(CASES)} and K >= 1, got {item!r}")
        args.steps_for[name] = int(k)
    if args.worker:
        if args.impl is None or args.case is None:
            parser.error("--worker needs --impl and --case")
        run_worker(args.impl, args.case, args.steps, args.threads)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
