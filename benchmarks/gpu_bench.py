"""GPU training-step benchmark at issue 7's anchor config: ours against transformers 4.57.6 and a GPT with SDPA.

One training step = forward + loss + backward (no optimizer step; gradients reset to None before each step), a
causal LM with labels = inputs, train mode (the config's default dropouts), on one CUDA device. The anchor config is

    d=1024, 16 layers, z=256, v=nffn=2048, N=16, rotary bias, causal (is_decoder), vocab 32000  (241M parameters)

and the GPT of performance-anchors.md (16 heads, ffn 4096, pre-LayerNorm, SDPA is_causal, tied embeddings).
Precision "autocast" is bf16 autocast over float32 weights (how the anchors were measured); "bf16" holds the
weights in bfloat16 (what DeepSpeed's bf16 mode trains, with float32 master weights in the optimizer).

Each case runs in a fresh worker process (its peak memory is its own, and a crash or an out-of-memory error only
loses that row); the parent prints a table and writes JSON. Per case: seconds/step (median of --steps timed steps
after --warmup steps, CUDA events), tokens/s, peak GiB (torch.cuda.max_memory_allocated over warm-up and timed
steps, weights and gradients included), TFLOP/s and MFU on two bases: 6 x parameters x tokens, and the exact
MEGA count of megatron_mega.training.flops (matrix multiplies, attention over whole chunks; the model's FLOPs, so
recomputation is not counted: PaLM's MFU, not a hardware utilisation). MFU is against --peak-tflops (989: the
H200's dense bf16 figure).

    python3 benchmarks/gpu_bench.py                                # the plan below, then the table
    python3 benchmarks/gpu_bench.py --only ours:4x4096:c1024 --steps 10
    python3 benchmarks/gpu_bench.py --worker --impl ours --batch 4 --seq 4096 --chunk 1024   # one row, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULT_MARKER = "GPU_BENCH_RESULT "

ANCHOR = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, shared_representation_size=256,
              intermediate_size=2048, nffn_hidden_size=2048, ema_projection_size=16,
              relative_positional_bias="rotary", is_decoder=True, bidirectional=False)


@dataclass
class Case:
    impl: str                 # ours | hf | gpt
    batch: int
    seq: int
    chunk: int = 0            # 0 = no chunking
    precision: str = "autocast"
    act_ckpt: bool = False
    compile: bool = False
    attention: str = "auto"   # auto | math: the SDPA backend (ours)
    keep: bool = False        # ours: selective recomputation off (model/block.py's set_selective_recompute)
    steps: int = 6
    warmup: int = 2

    @property
    def name(self) -> str:
        parts = [self.impl, f"{self.batch}x{self.seq}", f"c{self.chunk}" if self.chunk else "nochunk", self.precision]
        parts += ["ckpt"] if self.act_ckpt else []
        parts += ["compiled"] if self.compile else []
        parts += [f"sdpa-{self.attention}"] if self.attention != "auto" else []
        parts += ["keep"] if self.keep else []
        return ":".join(parts)


# in order of importance: a budget cut drops the tail. The compiled cases are what parallel.compile_blocks trains
# with (nn.Module.compile on each block); "bf16" is bfloat16 weights without autocast, what the trainer runs under
# DeepSpeed's bf16 mode (estimated 79.5 ms a step compiled, against 83.6 under autocast); the 1x16384 cases are
# the memory target (<= 20 GiB); "keep" rows price selective recomputation (parallel.selective_recompute, on by
# default) in speed and memory.
PLAN = [
    Case("ours", 4, 4096, 1024),
    Case("ours", 4, 4096, 1024, compile=True, warmup=3),
    Case("ours", 4, 4096, 1024, precision="bf16", compile=True, warmup=3),
    Case("gpt", 4, 4096),
    Case("ours", 1, 16384, 1024),
    Case("ours", 4, 4096, 1024, keep=True),
    Case("ours", 1, 16384, 1024, compile=True, warmup=3),
    Case("ours", 1, 262144, 1024, act_ckpt=True, steps=2, warmup=1),
    Case("hf", 4, 4096, 1024),
    Case("ours", 8, 2048, 0),
    Case("ours", 1, 65536, 1024, act_ckpt=True, steps=3, warmup=1),
]


def mega_kwargs(case: Case) -> dict:
    return dict(ANCHOR, use_chunking=case.chunk > 0, chunk_size=case.chunk if case.chunk else -1,
                max_positions=case.chunk if case.chunk else case.seq)


# ---------------------------------------------------------------------------------------------- the GPT reference
def build_gpt(vocab: int = 32000, d: int = 1024, layers: int = 16, heads: int = 16, ffn: int = 4096):
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            nn.init.normal_(self.embed.weight, std=0.02)

        def forward(self, input_ids, labels):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.embed.weight)
            return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1))

    return GPT()


# ---------------------------------------------------------------------------------------------- one case
def run_case(case: Case, peak_tflops: float, device_name: str = "cuda", profile: bool = False) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    # transformers' MEGA makes some tensors without a device (CPU) inside forward when built under a device context
    with device if case.impl != "hf" else nullcontext():
        if case.impl == "ours":
            from megatron_mega import MegaConfig, MegaForCausalLM

            config = MegaConfig(**mega_kwargs(case))
            model = MegaForCausalLM(config)
        elif case.impl == "hf":
            from transformers import MegaConfig as HFConfig, MegaForCausalLM as HFCausalLM

            model = HFCausalLM(HFConfig(**mega_kwargs(case)))
        elif case.impl == "gpt":
            model = build_gpt(d=ANCHOR["hidden_size"], layers=ANCHOR["num_hidden_layers"],
                              heads=max(1, ANCHOR["hidden_size"] // 64), ffn=4 * ANCHOR["hidden_size"])
        else:
            raise SystemExit(f"unknown impl {case.impl!r}")
    model = model.to(device)
    if case.keep:
        from megatron_mega.model.block import set_selective_recompute

        set_selective_recompute(model, False)
    if case.act_ckpt:
        model.gradient_checkpointing_enable()
    if case.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    if case.compile:
        if case.impl == "ours":
            from megatron_mega.model.block import compile_blocks

            compile_blocks(model)  # what parallel.compile_blocks trains with
        else:
            for block in model.blocks:
                block.compile()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 32000, (case.batch, case.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if case.precision == "autocast" else nullcontext()
    backend = nullcontext  # a context manager factory: sdpa_kernel's can be entered only once
    if case.attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend():
            return sdpa_kernel([SDPBackend.MATH])

    def step():
        with autocast, backend():
            out = model(input_ids=ids, labels=ids)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(case.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - started
    times = []
    for _ in range(case.steps):
        begin = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    if profile and cuda:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60),
              flush=True)
    tokens = case.batch * case.seq
    row = {"case": case.name, **asdict(case), "params": params, "s_per_step": seconds,
           "tokens_per_s": tokens / seconds,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"),
           "reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else float("nan"), "loss": float(loss),
           "warmup_s": warmup_s, "step_times": times}
    row["tflops_6n"] = 6 * params * tokens / seconds / 1e12
    if case.impl in ("ours", "hf"):
        from megatron_mega import MegaConfig
        from megatron_mega.training.flops import train_flops

        # the model's FLOPs, recomputation left out (PaLM's MFU; it would count activation checkpointing as progress)
        exact = train_flops(MegaConfig(**mega_kwargs(case)), case.batch, case.seq)
        row["tflops_exact"] = exact / seconds / 1e12
    row["mfu_6n"] = row["tflops_6n"] / peak_tflops
    if "tflops_exact" in row:
        row["mfu_exact"] = row["tflops_exact"] / peak_tflops
    return row


# ---------------------------------------------------------------------------------------------- the parent
def worker_command(case: Case, peak_tflops: float, device: str, tiny: bool, python: Optional[str]) -> list[str]:
    cmd = [python or sys.executable, os.path.abspath(__file__), "--worker", "--impl", case.impl,
           "--batch", str(case.batch), "--seq", str(case.seq), "--chunk", str(case.chunk),
           "--precision", case.precision, "--attention", case.attention, "--steps", str(case.steps),
           "--warmup", str(case.warmup),
           "--peak-tflops", str(peak_tflops), "--device", device] + (["--tiny"] if tiny else [])
    return cmd + (["--act-ckpt"] if case.act_ckpt else []) + (["--compile"] if case.compile else []) + (
        ["--keep"] if case.keep else [])


def run_worker(case: Case, args: argparse.Namespace, timeout: float) -> dict:
    started = time.perf_counter()
    python = args.hf_python if case.impl == "hf" else None
    try:
        proc = subprocess.run(worker_command(case, args.peak_tflops, args.device, args.tiny, python),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case.name, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            row = json.loads(line[len(RESULT_MARKER):])
            row["wall_s"] = time.perf_counter() - started
            return row
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
    return {"case": case.name, "error": "out of memory" if oom else " | ".join(tail)[-600:]}


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['case']:<44} {row['error']}"
    exact = f"{row['tflops_exact']:6.1f} {100 * row['mfu_exact']:5.1f}%" if "tflops_exact" in row else " " * 13
    return (f"{row['case']:<44} {row['s_per_step'] * 1000:9.1f} {row['tokens_per_s']:10,.0f} {row['peak_gib']:7.1f} "
            f"{row['tflops_6n']:6.1f} {100 * row['mfu_6n']:5.1f}% {exact}")


HEADER = (f"{'case':<44} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>7} {'TF/s6N':>6} {'MFU6N':>6} "
          f"{'TF/s':>6} {'MFU':>6}")


def parse_only(spec: str) -> Case:
    """impl:BxL[:cC][:bf16][:ckpt][:compiled][:math][:keep], e.g. ours:4x4096:c1024."""
    impl, shape, *flags = spec.split(":")
    batch, seq = (int(v) for v in shape.split("x"))
    case = Case(impl, batch, seq)
    for flag in flags:
        if flag.startswith("c") and flag[1:].isdigit():
            case.chunk = int(flag[1:])
        elif flag in ("bf16", "autocast"):
            case.precision = flag
        elif flag == "ckpt":
            case.act_ckpt = True
        elif flag == "compiled":
            case.compile = True
        elif flag == "math":
            case.attention = "math"
        elif flag == "keep":
            case.keep = True
        else:
            raise SystemExit(f"--only {spec}: unknown flag {flag!r}")
    return case


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--impl", default="ours")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--precision", default="autocast", choices=("autocast", "bf16"))
    p.add_argument("--attention", default="auto", choices=("auto", "math"))
    p.add_argument("--act-ckpt", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--keep", action="store_true", help="ours: selective recomputation off")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--only", nargs="+", default=None, help="cases instead of the plan, e.g. ours:4x4096:c1024")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the plan's remaining cases after this")
    p.add_argument("--case-timeout", type=float, default=150.0)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--profile", action="store_true", help="worker: print the top kernels of one more step")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the plumbing (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="small widths instead of the anchor's (dry runs)")
    p.add_argument("--hf-python", default=None, help="interpreter with transformers 4.57.6 (default: this one)")
    args = p.parse_args(argv)

    if args.tiny:
        ANCHOR.update(hidden_size=64, num_hidden_layers=2, shared_representation_size=16, intermediate_size=128,
                      nffn_hidden_size=128)
    if args.worker:
        case = Case(args.impl, args.batch, args.seq, args.chunk, args.precision, args.act_ckpt, args.compile,
                    args.attention, args.keep)
        case.steps = args.steps or case.steps
        case.warmup = args.warmup if args.warmup is not None else case.warmup
        print(RESULT_MARKER + json.dumps(run_case(case, args.peak_tflops, args.device, args.profile)), flush=True)
        return 0

    cases = [parse_only(s) for s in args.only] if args.only else PLAN
    if args.steps:
        for case in cases:
            case.steps = args.steps
    started = time.perf_counter()
    rows = []
    print(HEADER, flush=True)
    for case in cases:
        left = args.budget_s - (time.perf_counter() - started)
        if left < 20:
            rows.append({"case": case.name, "error": "skipped: out of the time budget"})
        else:
            rows.append(run_worker(case, args, min(args.case_timeout, left)))
        print(format_row(rows[-1]), flush=True)
    by_name = {r["case"]: r for r in rows if "error" not in r}
    ours, hf = by_name.get("ours:4x4096:c1024:autocast"), by_name.get("hf:4x4096:c1024:autocast")
    gpt = by_name.get("gpt:4x4096:nochunk:autocast")
    if ours and hf:
        print(f"ours / transformers at 4x4096 chunk 1024: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s")
    if ours and gpt:
        print(f"ours / GPT+SDPA at 4x4096: {ours['tokens_per_s'] / gpt['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, args.json)
    return 0 if all("error" not in r or r["error"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
