"""What one COMPILED MegaBlock's training pass (forward + backward) would cost on an H200, estimated on a machine
without one, for comparison with benchmarks/gpu_cost_model.py's estimate of the eager layer.

gpu_cost_model prices the eager step kernel by kernel; most of an eager layer's estimated time is a long tail of
small elementwise kernels (~380 a layer), which is what `parallel.compile_blocks` (model/block.py `compile_blocks`,
nn.Module.compile on every MegaBlock) should remove. Without a GPU that cannot be measured, so this asks inductor
itself what it would run: one MegaBlock at the GPU anchor's widths (gpu_bench's ANCHOR: d=1024, z=256,
v=nffn=2048, rotary, causal, chunk 1024), in train mode (dropout on), is compiled as compile_blocks does it and
run forward and backward under bf16 autocast on real CPU tensors, batch 1, at one or two sequence lengths, with our
model's CUDA choices where they differ from the CPU's (gpu_cost_model.cuda_paths: plain baddbmm + softmax
attention rather than SDPA; under compile `recomputing()` is false and dropout is F.dropout, as on CUDA). Then:

- the fused kernels: every node inductor's scheduler hands to code generation (after fusion) in the forward and
  backward graphs, each one kernel, priced by the bytes it reads and writes (the scheduler's own
  `get_read_write_buffers_sizes`, the same figure as torch._inductor.metrics.num_bytes_accessed) at --bandwidth,
  plus --launch-us. The CPU backend's "outer loop fusion" (several loop nests under one outer loop, which the
  CUDA backend does not do) is split back into its parts, one kernel each;
- the extern kernels (mm/bmm/addmm/baddbmm, the FFTs, the complex elementwise ops inductor leaves to ATen, the
  seed draw of its random numbers): recorded as ATen operations by a TorchDispatchMode around a second, already
  compiled pass, and priced exactly as gpu_cost_model prices them (its Tally and Rates: matmuls by flops, FFTs by
  bytes at its FFT efficiency, plus the launch).

With two lengths every total is taken as linear in tokens (at a fixed chunk size the attention and everything else
is; the parameters' reads and gradients are the constant part) and extrapolated to batch x seq tokens; with one
length it is scaled in proportion (which also scales the constant part: a small overestimate). The projected step
is 16 such layers plus the embedding and loss (eager, not compiled by compile_blocks) from gpu_cost_model's tally
of the eager step (a 1-layer model minus its per-layer part), which also gives the eager layer for comparison.

What it does not model: CPU inductor generates C++ loops, not Triton, so its fusion decisions differ somewhat from
what the CUDA backend would make (Triton fuses some reductions with their consumers that C++ may not, and the
reverse); CPU autocast's lists of ops cast to bf16 differ a little from CUDA's (as in gpu_cost_model); a fused
kernel's bytes are the scheduler's "best case" (each buffer counted once); no cuBLAS shape effects, no cache reuse,
no host time (compiled code launches its kernels from one Python wrapper: ~a few us each, usually hidden behind
the GPU). The same roofline constants as gpu_cost_model, so compare the two; check both against a GPU when lent
(gpu_bench.py's compile=True cases measure the real thing).

It takes real CPU time: compiling one block's forward and backward on 2 cores is ~3 minutes per length.

    .venv/bin/python benchmarks/compiled_cost_model.py                    # lengths 2048 and 4096, 4x4096 step
    .venv/bin/python benchmarks/compiled_cost_model.py --lengths 2048     # one length, scaled (about half the time)
    .venv/bin/python benchmarks/compiled_cost_model.py --no-eager --top 30
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402

from gpu_bench import ANCHOR, Case, mega_kwargs  # noqa: E402
from gpu_cost_model import Rates, cuda_paths, eager_layers  # noqa: E402


@dataclass
class Kernel:
    phase: str
    bytes: int
    what: str  # fused: the ATen ops fused into it, as inductor's node origins name them; extern: the kernel
    flops: float = 0.0
    extern: bool = False
    dtype: str = "-"
    where: str = "-"  # fused: the model's source lines its ATen ops come from (their innermost frame in the package)

    def seconds(self, rates: Rates) -> float:
        return rates.seconds(self.flops, self.bytes, self.dtype, fft="_fft" in self.what)


MATMULS = ("mm", "addmm", "bmm", "baddbmm")
# fallbacks that only reinterpret a buffer (fft_conv's real form of complex products): no kernel, no bytes moved
VIEWS = ("view_as_real", "view_as_complex")


@dataclass
class Pass:
    """One compiled block's forward + backward at `tokens` tokens."""
    tokens: int
    kernels: list = field(default_factory=list)  # Kernel
    graphs: int = 0
    breaks: int = 0
    wall_s: float = 0.0

    def select(self, extern: bool, phase=None) -> list:
        return [k for k in self.kernels if k.extern == extern and phase in (None, k.phase)]

    def total(self, attr: str, extern: bool, phase=None, rates: Rates = None) -> float:
        return sum(k.seconds(rates) if attr == "seconds" else getattr(k, attr) for k in self.select(extern, phase))


_FRAME = re.compile(r'File "[^"]*/megatron_mega/([^"]+)", line (\d+)')


def _origins(node) -> tuple[str, str]:
    """The ATen ops fused into a kernel and the source lines they come from (a backward op carries its forward
    op's stack trace), each with its count."""
    names, lines = Counter(), Counter()
    for sub in node.get_nodes():
        for origin in getattr(sub.node, "origins", None) or ():
            target = getattr(origin, "target", None)
            if origin.op == "call_function" and target is not None:
                names[str(getattr(target, "__name__", target)).split(".")[0]] += 1
                frames = _FRAME.findall(origin.meta.get("stack_trace") or "")
                if frames:
                    lines["%s:%s" % frames[-1]] += 1

    def show(counter, n):
        return " ".join(f"{k}" + (f"x{c}" if c > 1 else "") for k, c in counter.most_common(n)) or "-"
    return show(names, 6), show(lines, 4)


class _SchedulerTap:
    """Wraps inductor's Scheduler.codegen to list the kernels it is about to generate."""

    def __init__(self):
        self.phase = "forward"
        self.kernels: list[Kernel] = []

    def __enter__(self):
        from torch._inductor import scheduler

        self._scheduler = scheduler
        self._codegen = scheduler.Scheduler.codegen
        tap = self

        def codegen(sched_self):
            tap.collect(sched_self.nodes)
            return tap._codegen(sched_self)

        scheduler.Scheduler.codegen = codegen
        return self

    def __exit__(self, *exc):
        self._scheduler.Scheduler.codegen = self._codegen

    def collect(self, nodes) -> None:
        from torch._inductor import ir

        s = self._scheduler
        for node in nodes:
            if isinstance(node, s.NopKernelSchedulerNode):
                continue  # no kernel
            if isinstance(node, s.ExternKernelSchedulerNode):
                if not isinstance(node.node, ir.MultiOutput):  # MultiOutput: a tuple's element, no kernel
                    kernel = self.extern(node)
                    if kernel.what.split(".")[0] not in VIEWS:
                        self.kernels.append(kernel)
                continue
            parts = node.get_outer_nodes() if hasattr(node, "get_outer_nodes") else [node]
            for part in parts:  # the CPU's outer-loop fusion, undone: one kernel per loop nest
                what, where = _origins(part)
                self.kernels.append(Kernel(self.phase, int(part.get_read_write_buffers_sizes()), what, where=where))

    def extern(self, node) -> Kernel:
        """An extern kernel (a cuBLAS matmul, an FFT, an op left to ATen): bytes as the scheduler counts them,
        flops for the matmuls (2 x output elements x the reduced dimension)."""
        kernel = node.node
        name = getattr(kernel, "python_kernel_name", None) or type(kernel).__name__
        op = getattr(kernel, "op_overload", None)
        if op is not None:
            name = str(op)
        short = name.replace("extern_kernels.", "").replace("torch.ops.aten.", "").replace("aten.", "")
        flops = 0.0
        try:
            dtype = str(kernel.get_dtype()).replace("torch.", "")
        except Exception:
            dtype = "-"
        if short.split(".")[0] in MATMULS:
            out = [int(d) for d in kernel.get_size()]
            reduced = int(kernel.inputs[-2].get_size()[-1])
            flops = 2.0 * reduced
            for d in out:
                flops *= d
            dtype = str(kernel.inputs[-2].get_dtype()).replace("torch.", "")
        return Kernel(self.phase, int(node.get_read_write_buffers_sizes()), short, flops, True, dtype)


def compiled_pass(seq: int, chunk: int, precision: str = "autocast") -> Pass:
    """Compile one fresh MegaBlock at batch 1 x seq and run it forward and backward once (compiling), listing the
    kernels of its two graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from megatron_mega import MegaConfig
    from megatron_mega.model.block import MegaBlock, compile_blocks

    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    result = Pass(tokens=seq)
    with cuda_paths(), _SchedulerTap() as tap:
        torch.manual_seed(0)
        block = MegaBlock(MegaConfig(**mega_kwargs(Case("ours", 1, seq, chunk)))).train()
        # bf16: bfloat16 weights and activations without autocast (DeepSpeed's bf16 mode)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        block.to(dtype)
        compile_blocks(block)  # what parallel.compile_blocks does (its backward's autocast setting included)
        x = torch.randn(1, seq, ANCHOR["hidden_size"], dtype=dtype, requires_grad=True)
        grad = torch.randn(1, seq, ANCHOR["hidden_size"], dtype=dtype)

        def step(phase_hook):
            block.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
                y = block(x, None, use_cache=False)[0]
            phase_hook("backward")
            y.backward(grad)

        def set_tap(phase):
            tap.phase = phase

        step(set_tap)  # compiles the forward graph, then (lazily, in backward) the backward one
        result.kernels = list(tap.kernels)
    result.graphs = int(counters["stats"].get("unique_graphs", 0))
    result.breaks = sum(counters["graph_break"].values())
    result.wall_s = time.perf_counter() - start
    return result


def extrapolate(values: list[tuple[int, float]], tokens: int) -> float:
    """A linear fit through (tokens, value) points, at `tokens`; with one point, in proportion."""
    if len(values) == 1:
        (t, v), = values
        return v * tokens / t
    (t1, v1), (t2, v2) = values[0], values[-1]
    return v1 + (v2 - v1) * (tokens - t1) / (t2 - t1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096],
                   help="sequence lengths of the compiled passes (batch 1; multiples of --chunk)")
    p.add_argument("--batch", type=int, default=4, help="the projected step's batch")
    p.add_argument("--seq", type=int, default=4096, help="the projected step's sequence length")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--layers", type=int, default=ANCHOR["num_hidden_layers"])
    p.add_argument("--top", type=int, default=15, help="the N largest fused kernels (by bytes) to list")
    p.add_argument("--no-eager", action="store_true",
                   help="skip gpu_cost_model's eager tally (no embedding + loss part, no eager comparison)")
    p.add_argument("--precision", default="autocast", choices=("autocast", "bf16"),
                   help="bf16 autocast over float32 weights, or bfloat16 weights without autocast (the trainer's)")
    p.add_argument("--save", metavar="PATH", help="pickle the compiled passes' kernels to PATH")
    p.add_argument("--load", metavar="PATH", help="price the kernels saved by --save instead of compiling")
    p.add_argument("--matmul-tflops", type=float, default=Rates.matmul_tflops)
    p.add_argument("--bandwidth-tbs", type=float, default=Rates.bandwidth_tbs)
    p.add_argument("--launch-us", type=float, default=Rates.launch_us)
    args = p.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch._inductor.config.fx_graph_cache = False  # a cache hit would skip the scheduler, and so the tap
    torch._functorch.config.enable_autograd_cache = False
    rates = Rates(matmul_tflops=args.matmul_tflops, bandwidth_tbs=args.bandwidth_tbs, launch_us=args.launch_us)
    tokens = args.batch * args.seq
    lengths = sorted(set(args.lengths))

    passes = []
    if args.load:
        with open(args.load, "rb") as f:
            loaded = pickle.load(f)
        lengths = [run.tokens for run in loaded]
    for seq in lengths:
        run = loaded[lengths.index(seq)] if args.load else compiled_pass(seq, args.chunk, args.precision)
        passes.append(run)
        print(f"compiled block, 1x{seq} chunk {args.chunk}: {run.graphs} graph(s), {run.breaks} graph break(s), "
              f"{len(run.select(False, 'forward'))} + {len(run.select(False, 'backward'))} fused kernels and "
              f"{len(run.select(True, 'forward'))} + {len(run.select(True, 'backward'))} extern ones "
              f"(forward + backward), {run.wall_s:.0f} s", flush=True)

    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump(passes, f)

    def fit(attr: str, extern: bool, phase=None) -> float:
        return extrapolate([(run.tokens, float(run.total(attr, extern, phase, rates))) for run in passes], tokens)

    last = passes[-1]
    if len({len(run.kernels) for run in passes}) > 1:
        print("  note: the kernel count differs between lengths; the longest length's is used")
    fused_n, extern_n = len(last.select(False)), len(last.select(True))
    fused_bytes = {ph: fit("bytes", False, ph) for ph in ("forward", "backward")}
    fused_s = sum(fused_bytes.values()) / (rates.bandwidth_tbs * 1e12) + fused_n * rates.launch_us * 1e-6
    extern_s = fit("seconds", True)
    matmul_s = extrapolate([(run.tokens, sum(k.seconds(rates) for k in run.select(True) if k.flops))
                            for run in passes], tokens)
    layer_s = fused_s + extern_s
    kernels = fused_n + extern_n
    moved = sum(fused_bytes.values()) + fit("bytes", True)

    basis = "fit through " + " and ".join(map(str, lengths)) if len(lengths) > 1 else f"scaled from {lengths[0]}"
    print(f"\none compiled MegaBlock, forward + backward, {args.batch}x{args.seq} tokens ({basis})")
    print(f"  {kernels} kernels per layer ({fused_n} fused, {extern_n} extern), "
          f"{moved / 2 ** 30:.2f} GiB moved per layer, {fit('flops', True) / 1e12:.2f} TFLOP")
    print(f"  estimated {layer_s * 1e3:.2f} ms per layer: fused kernels {fused_s * 1e3:.2f} ms "
          f"({fused_bytes['forward'] / 2 ** 30:.2f} + {fused_bytes['backward'] / 2 ** 30:.2f} GiB forward + backward), "
          f"extern {extern_s * 1e3:.2f} ms (matrix multiplies {matmul_s * 1e3:.2f} ms)")

    if not args.no_eager:
        case = Case("ours", args.batch, args.seq, args.chunk, args.precision)
        one, layer = eager_layers("ours", case, rates)
        eager_s = sum(op.seconds for op in layer.values())
        eager_n = sum(op.count for op in layer.values())
        eager_bytes = sum(op.bytes for op in layer.values())
        eager_flops = sum(op.flops for op in layer.values())
        rest_s = one.total("seconds") - eager_s
        step_s = rest_s + args.layers * layer_s
        eager_step_s = rest_s + args.layers * eager_s
        print(f"  eager layer (gpu_cost_model): {eager_s * 1e3:.2f} ms, {eager_n} kernels, "
              f"{eager_bytes / 2 ** 30:.2f} GiB moved, {eager_flops / 1e12:.2f} TFLOP: compiled / eager "
              f"{layer_s / eager_s:.2f}")
        print(f"\nprojected step, {args.layers} compiled layers + eager embedding and loss ({rest_s * 1e3:.1f} ms): "
              f"{step_s * 1e3:.1f} ms = {tokens / step_s:,.0f} tokens/s "
              f"(all eager: {eager_step_s * 1e3:.1f} ms = {tokens / eager_step_s:,.0f} tokens/s)")

    if args.top:
        scale = tokens / last.tokens
        print(f"\n  the {args.top} largest fused kernels (bytes scaled x{scale:g} from 1x{last.tokens}):")
        print(f"  {'phase':<9} {'MiB':>8} {'us':>7}  fused ATen ops")
        for k in sorted(last.select(False), key=lambda k: -k.bytes)[:args.top]:
            mib = k.bytes * scale / 2 ** 20
            us = k.bytes * scale / (rates.bandwidth_tbs * 1e12) * 1e6 + rates.launch_us
            print(f"  {k.phase:<9} {mib:>8.1f} {us:>7.1f}  {k.what[:90]}")
            if k.where != "-":
                print(f"  {'':<9} {'':>8} {'':>7}    at {k.where[:110]}")
        print(f"\n  the extern kernels, by total at 1x{last.tokens} (unscaled):")
        groups = {}
        for k in last.select(True):
            g = groups.setdefault((k.phase, k.what, k.dtype), [0, 0.0, 0.0, 0.0])
            g[0] += 1
            g[1] += k.flops
            g[2] += k.bytes
            g[3] += k.seconds(rates)
        for (phase, what, dtype), (n, flops, nbytes, sec) in sorted(groups.items(), key=lambda kv: -kv[1][3]):
            print(f"  {phase:<9} {what[:34]:<34} {dtype:<10} {n:>3} x {flops / 1e9:>8.1f} GFLOP "
                  f"{nbytes / 2 ** 20:>8.1f} MiB {sec * 1e3:>7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
