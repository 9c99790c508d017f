"""Profile one training step (forward + loss + backward) of MegaForMaskedLM on CPU with torch.profiler.

Same anchor config, inputs and threads as benchmarks/model_bench.py. One warm-up step, then one profiled step; prints
the operator table sorted by self CPU time (forward and backward operators together: autograd's backward ops show as
`...Backward0` nodes and the kernels they call) and a table grouped by input shapes; with --modules also the time of
each module's forward (record_function labels put on by hooks), with --memory the operators by memory allocated.

    .venv/bin/python benchmarks/profile_step.py --case 4x1024_c128 --modules --memory
    .venv/bin/python benchmarks/profile_step.py --case 4x4096_c128 --rows 40 --trace /tmp/trace.json
    .venv-hf/bin/python benchmarks/profile_step.py --impl hf --case 4x1024_c128   # transformers, for comparison
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import CASES, MASK_FRACTION, config_kwargs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("ours", "hf"), default="ours")
    parser.add_argument("--case", choices=list(CASES), default="4x1024_c128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--memory", action="store_true", help="also profile memory (slower)")
    parser.add_argument("--trace", help="write a chrome trace here")
    parser.add_argument("--stack", action="store_true", help="also group the top operators by Python stack")
    parser.add_argument("--modules", action="store_true", help="label every module's forward (adds overhead)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    if args.impl == "ours":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not the installed one
        from megatron_mega import MegaConfig, MegaForMaskedLM
    else:
        import transformers
        from transformers import MegaConfig, MegaForMaskedLM

        transformers.logging.set_verbosity_error()
    batch, seq_len, _ = CASES[args.case]
    torch.manual_seed(0)
    model = MegaForMaskedLM(MegaConfig(**config_kwargs(args.case))).train()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 32000, (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(batch, seq_len, generator=generator) >= MASK_FRACTION] = -100

    if args.modules:
        # label each leaf-ish module's forward so its total time shows up in the table
        def pre(module, _inputs):
            module._bench_rf = record_function(f"module::{module._bench_name}")
            module._bench_rf.__enter__()

        def post(module, _inputs, _output):
            module._bench_rf.__exit__(None, None, None)

        for name, module in model.named_modules():
            if name.count(".") <= 4:
                module._bench_name = f"{type(module).__name__}({name.split('.')[-1] or 'root'})"
                module.register_forward_pre_hook(pre)
                module.register_forward_hook(post)

    def step():
        model.zero_grad(set_to_none=True)
        with record_function("## forward+loss"):
            loss = model(input_ids=input_ids, labels=labels).loss
        with record_function("## backward"):
            loss.backward()
        return loss

    start = time.perf_counter()
    step()
    print(f"warm-up step {time.perf_counter() - start:.2f} s")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=args.memory,
                 with_stack=args.stack) as prof:
        start = time.perf_counter()
        step()
        print(f"profiled step {time.perf_counter() - start:.2f} s")
    averages = prof.key_averages()
    print("\n### operators by self CPU time")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    print("\n### operators by self CPU time, grouped by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                              max_name_column_width=40, max_shapes_column_width=90))
    if args.stack:
        print("\n### top operators by self CPU time with the Python code that called them (5 frames)")
        by_stack = sorted(prof.key_averages(group_by_stack_n=5), key=lambda e: e.self_cpu_time_total, reverse=True)
        shown = 0
        for event in by_stack:
            if not event.key.startswith("aten::") or not event.stack:
                continue
            print(f"{event.self_cpu_time_total / 1e3:9.1f} ms  {event.count:4d} x  {event.key}")
            for frame in event.stack:
                print(f"{'':20}{frame}")
            shown += 1
            if shown >= args.rows:
                break
        if not shown:
            print("(no Python stacks were recorded: this torch build's profiler returned empty stacks)")
    if args.modules:
        print("\n### module forwards (CPU total, forward only; backward is attributed to autograd nodes)")
        mods = [e for e in averages if e.key.startswith("module::")]
        for event in sorted(mods, key=lambda e: e.cpu_time_total, reverse=True)[: args.rows]:
            print(f"{event.cpu_time_total / 1e3:9.1f} ms  {event.count:4d} x  {event.key}")
    if args.memory:
        print("\n### operators by self CPU memory")
        print(averages.table(sort_by="self_cpu_memory_usage", row_limit=args.rows, max_name_column_width=50))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
