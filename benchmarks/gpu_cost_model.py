"""What a training step would cost on an H200, estimated on a machine without one: every kernel of the step at the
GPU shapes, each priced by a roofline.

Sessions without a GPU need to know where a GPU step's time goes before they change the code for it. This runs the
step (forward, loss, backward) of the 241M GPU anchor (benchmarks/gpu_bench.py's ANCHOR, or its GPT, or
transformers' MEGA) on fake tensors (torch's FakeTensorMode: shapes, dtypes and strides, no data, no arithmetic),
with bf16 autocast as gpu_bench runs it, and records every ATen operation the step dispatches. The CUDA paths of our
model are taken where they differ from the CPU's: plain-matmul softmax attention, the attention replay of selective
recomputation, bool dropout masks drawn by bernoulli_, the LM loss over the whole vocabulary at once. Each operation
is then priced as one kernel:

    time = max(flops / matmul rate, bytes / memory rate) + launch,   bytes = what it reads + what it writes

with matmul-class operations (those with a FLOP formula in torch.utils.flop_counter) at --matmul-tflops, FFTs at
--fft-efficiency of --bandwidth, everything else at --bandwidth, views free. Data-dependent steps (nonzero, reading
a scalar) are answered as for a batch whose tokens are all labelled and whose loss is the graph's root.

It is a model, not a measurement: it knows nothing of cuBLAS's shape preferences, cache reuse, or eager Python's
CPU time (it counts the kernels; at ~10 us each a step of N kernels cannot be shorter than N x 10 us). What it is for:
ranking the parts of a step by what they cost, and comparing two versions of the code, or ours against the GPT and
transformers, at the same constants. Check its constants against a GPU's measured step times when one is lent
(performance-anchors.md: GPT+SDPA 187,016 tokens/s, transformers 74,139 at 4x4096 chunk 1024).

    .venv/bin/python benchmarks/gpu_cost_model.py                          # ours, 4x4096 chunk 1024, the table
    .venv/bin/python benchmarks/gpu_cost_model.py --impl gpt
    .venv-hf/bin/python benchmarks/gpu_cost_model.py --impl hf             # transformers 4.57.6's MEGA
    .venv/bin/python benchmarks/gpu_cost_model.py --keep --top 40          # selective recomputation off
    .venv/bin/python benchmarks/gpu_cost_model.py --by-line                # a layer's cost by source line
    .venv/bin/python benchmarks/gpu_cost_model.py --memory --batch 1 --seq 16384   # the step's peak memory

`--memory` follows the bytes of live tensors through the whole model's step instead. Against H200 measurements
(performance-anchors.md and the 2026-11-28 GPU run) it came out 0-12% high: GPT+SDPA at 1x16384 16.3 GiB
(measured 16.5), transformers 64.8 (60.1) and, at 4x4096, 43.8 (39.0); our code of that run 36.9 (33.4). Its
speed estimates: GPT+SDPA 193.6k tokens/s (measured 187.0k: x0.97; before its FlashAttention had a FLOP formula
here, 270k: x0.69), transformers 92k (74k: x0.81, its eager step's thousands of kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

from gpu_bench import ANCHOR, Case, build_gpt, mega_kwargs  # noqa: E402

aten = torch.ops.aten
FFT = {aten._fft_r2c, aten._fft_c2r, aten._fft_c2c}
# no kernel: metadata only, or an allocation
FREE = {aten.empty, aten.empty_like, aten.empty_strided, aten.detach, aten.lift_fresh, aten.set_, aten.resize_}


@dataclass
class Rates:
    matmul_tflops: float = 660.0   # bf16 GEMMs of these shapes on an H200 (dense peak 989)
    fp32_matmul_tflops: float = 330.0  # TF32 (gpu_bench allows it)
    bandwidth_tbs: float = 3.9     # HBM3e, 4.8 TB/s peak, what a large elementwise kernel reaches
    fft_efficiency: float = 0.6    # cuFFT's share of that bandwidth (two passes for the longer transforms)
    launch_us: float = 2.5         # a kernel's fixed cost on the device (launch, tail)
    # FlashAttention-2 (SDPA's flash kernel) forward + backward at head dim 64, causal, bf16: about half the GEMM
    # rate (its published H100 figures; the H200 has the same compute)
    attention_tflops: float = 300.0

    def seconds(self, flops: float, moved: float, dtype: str, fft: bool = False, attention: bool = False) -> float:
        """One kernel's time: matmul-class kernels (flops > 0) at the matmul rate of their dtype (a fused
        attention kernel at the attention rate) or their bytes' time, whichever is longer; FFTs at their share of
        the bandwidth; the rest by bytes; plus the launch."""
        bandwidth = self.bandwidth_tbs * 1e12
        if flops:
            rate = self.matmul_tflops if dtype in ("bfloat16", "float16") else self.fp32_matmul_tflops
            rate = self.attention_tflops if attention else rate
            busy = max(flops / (rate * 1e12), moved / bandwidth)
        else:
            busy = moved / (bandwidth * (self.fft_efficiency if fft else 1.0))
        return busy + self.launch_us * 1e-6


@dataclass
class Op:
    name: str
    phase: str
    dtype: str
    count: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class Tally:
    rates: Rates
    phase: str = "forward"
    ops: dict = field(default_factory=dict)
    by_line: bool = False  # key operations by the model's source line that issued them, not by their name

    def add(self, func, args, kwargs, out) -> None:
        packet = func._overloadpacket
        if packet in FREE or func.is_view or _is_view_like(packet):
            return
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or func.namespace != "aten":
            return  # a query of metadata (sizes, device), not a kernel
        moved = sum(_read_bytes(t) for t in ins) + sum(t.numel() * t.element_size() for t in outs)
        flops = 0.0
        attention = packet in FUSED_ATTENTION
        if attention:
            flops = _fused_attention_flops(packet, args, kwargs or {})
        elif packet in flop_registry:
            try:
                flops = float(flop_registry[packet](*args, **(kwargs or {}), out_val=out))
            except Exception:  # a formula that does not take these arguments: price by bytes
                flops = 0.0
        dtype = str(outs[0].dtype).replace("torch.", "")
        seconds = self.rates.seconds(flops, moved, dtype, fft=packet in FFT, attention=attention)
        name = str(packet).replace("aten.", "")
        key = (self.phase, _source_line() + " " + name if self.by_line else name, dtype)
        op = self.ops.setdefault(key, Op(key[1], self.phase, dtype))
        op.count += 1
        op.flops += flops
        op.bytes += moved
        op.seconds += seconds

    def total(self, attr: str) -> float:
        return sum(getattr(op, attr) for op in self.ops.values())


# the CPU's fused SDPA, which the GPT's attention dispatches to on these fake CPU tensors where a GPU runs
# FlashAttention; torch's flop counter has formulas for the CUDA kernels only (priced by bytes alone, the GPT's
# attention cost ~0.07 ms a layer instead of ~1.6 ms)
FUSED_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu,
                   aten._scaled_dot_product_flash_attention_for_cpu_backward}


def _fused_attention_flops(packet, args, kwargs) -> float:
    """What a flash kernel computes: forward q k^T and p v (2 products), backward their recomputation and 4
    gradients' (5 products: 2.5x the forward), over half of the (query, key) pairs when causal (whole masked
    blocks are skipped)."""
    backward = packet is aten._scaled_dot_product_flash_attention_for_cpu_backward
    query, key, value = args[1:4] if backward else args[0:3]
    position = 7 if backward else 4  # is_causal, in the two schemas
    causal = bool(kwargs.get("is_causal", args[position] if len(args) > position else False))
    *lead, n_query, head = query.shape
    pairs = n_query * key.shape[-2]
    for size in lead:
        pairs *= size
    forward = 2.0 * pairs * (head + value.shape[-1])
    return forward * (2.5 if backward else 1.0) * (0.5 if causal else 1.0)


_VIEW_NAMES = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
               "squeeze", "split", "split_with_sizes", "as_strided", "alias", "_reshape_alias", "unbind", "narrow",
               "view_as_real", "view_as_complex", "diagonal", "unfold", "_conj", "conj", "real", "imag",
               "_neg_view", "resolve_conj", "resolve_neg", "chunk", "reshape", "flatten", "movedim"}


def _source_line() -> str:
    """The innermost frame of the model's code (ours or transformers'), as file:line; "autograd" for a backward
    operation that autograd derived rather than code of ours ran."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if ("megatron_mega" in path or "modeling_mega" in path or path.endswith("gpu_bench.py")) \
                and "gpu_cost_model" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "autograd"


def _is_view_like(packet) -> bool:
    return str(packet).replace("aten.", "") in _VIEW_NAMES


def _read_bytes(t: torch.Tensor) -> int:
    # a broadcast (stride 0) input is read once per element of its storage, not once per element of the view
    try:
        stored = t.untyped_storage().nbytes()
    except Exception:
        stored = t.numel() * t.element_size()
    return min(t.numel() * t.element_size(), stored)


class LiveBytes:
    """The bytes of device memory the step's tensors hold, followed through the step: a storage counts from the
    operation that makes it until the last tensor on it is freed (weakref finalizers on the fake tensors). Its
    peak is what torch.cuda.max_memory_allocated would report for the same step, less the allocator's rounding
    and the libraries' workspaces (cuBLAS, cuFFT), plus `base`: what exists before the step (weights)."""

    def __init__(self, base: int = 0, exclude: Iterable[torch.Tensor] = ()):
        self.current = self.peak = base
        self.after = 0  # what the step leaves held (weights, gradients), set by tally_step
        self.peak_phase = self.peak_line = ""
        self.phase = "forward"
        self.live: dict[int, list[int]] = {}  # storage address -> [tensors on it, bytes]
        self.exclude = {t.untyped_storage()._cdata for t in exclude}

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.exclude:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, storage.nbytes()]
            self.current += entry[1]
            if self.current > self.peak:
                self.peak, self.peak_phase, self.peak_line = self.current, self.phase, _source_line()
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]


class _Record(TorchDispatchMode):
    """Records every operation in `tally`. Small tensors made from Python numbers (torch.tensor([...]), which
    transformers' MEGA uses for its shapes) are followed with their real values, so that reading them back gives
    the right number; other values read back are answered as the module docstring says."""

    _SMALL = 64

    def __init__(self, tally: Tally, memory: Optional[LiveBytes] = None):
        super().__init__()
        self.tally = tally
        self.memory = memory
        self.known: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(fake) -> (fake, its real value)

    def _real(self, t):
        if isinstance(t, torch.Tensor):
            hit = self.known.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
            if not isinstance(t, FakeTensor) and t.numel() <= self._SMALL:
                return t  # a real tensor handed to the fake mode (lift_fresh)
            raise LookupError
        return t

    def _follow(self, func, args, kwargs, out) -> None:
        flat, _ = tree_flatten((args, kwargs))
        if not any(isinstance(t, torch.Tensor) for t in flat):
            return
        outs = tree_flatten(out)[0]
        if not outs or not all(isinstance(t, torch.Tensor) and t.numel() <= self._SMALL for t in outs):
            return
        try:
            real_args = tree_map(self._real, args)
            real_kwargs = tree_map(self._real, kwargs)
        except LookupError:
            return
        with unset_fake_temporarily():
            values = tree_flatten(func(*real_args, **real_kwargs))[0]
        for fake, value in zip(outs, values):
            self.known[id(fake)] = (fake, value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet is aten._local_scalar_dense:
            hit = self.known.get(id(args[0]))
            if hit is not None and hit[0] is args[0]:
                with unset_fake_temporarily():
                    return hit[1].item()
            # a value computed on the device, read back to Python: the loss's incoming gradient (1.0 at the root)
            # or a count
            return 1 if args[0].dtype in (torch.int64, torch.int32, torch.bool) else 1.0
        if packet is aten.nonzero:
            # the labelled rows of a batch whose tokens are all labelled: every index
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.int64, device=x.device)
        out = func(*args, **kwargs)
        self._follow(func, args, kwargs, out)
        self.tally.add(func, args, kwargs, out)
        if self.memory is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.memory.track(t)
        return out


@contextlib.contextmanager
def cuda_paths():
    """Our model's CUDA choices, taken on these CPU fake tensors (see each function's docstring); undone on exit."""
    import megatron_mega.model.attention as attention
    import megatron_mega.model.dropout as dropout
    import megatron_mega.model.lm_loss as lm_loss

    def cuda_drop_mask(shape, p, device=None):
        return torch.empty(tuple(shape), dtype=torch.bool, device=device).bernoulli_(1.0 - p)

    saved = (dropout.drop_mask, attention.drop_mask, attention.fused_softmax_attention,
             attention.ChunkedAttention.replay_off_cuda, lm_loss.whole_vocabulary)
    dropout.drop_mask = attention.drop_mask = cuda_drop_mask
    attention.fused_softmax_attention = lambda q: False
    attention.ChunkedAttention.replay_off_cuda = True
    lm_loss.whole_vocabulary = lambda device: True
    try:
        yield
    finally:
        (dropout.drop_mask, attention.drop_mask, attention.fused_softmax_attention,
         attention.ChunkedAttention.replay_off_cuda, lm_loss.whole_vocabulary) = saved


def build(impl: str, layers: int, case: Case, keep: bool):
    if case.precision != "bf16":
        return _build(impl, layers, case, keep)
    # the weights themselves in bfloat16, as DeepSpeed's bf16 mode trains (the trainer runs no autocast); built and
    # cast as real tensors (a fake parameter cannot be swapped for its cast), which the fake step then reads
    with unset_fake_temporarily():
        return _build(impl, layers, case, keep).to(torch.bfloat16)


def _build(impl: str, layers: int, case: Case, keep: bool):
    kwargs = dict(mega_kwargs(case), num_hidden_layers=layers)
    if impl == "ours":
        from megatron_mega import MegaConfig, MegaForCausalLM
        from megatron_mega.model.block import set_selective_recompute

        model = MegaForCausalLM(MegaConfig(**kwargs))
        if keep:
            set_selective_recompute(model, False)
        return model
    if impl == "hf":
        from transformers import MegaConfig as HFConfig, MegaForCausalLM as HFCausalLM

        return HFCausalLM(HFConfig(**kwargs))
    return build_gpt(d=ANCHOR["hidden_size"], layers=layers, heads=max(1, ANCHOR["hidden_size"] // 64),
                     ffn=4 * ANCHOR["hidden_size"])


def tally_step(impl: str, layers: int, case: Case, rates: Rates, keep: bool = False, by_line: bool = False,
               memory: bool = False) -> tuple[Tally, Optional[LiveBytes]]:
    """The operations of one training step (and, with `memory`, the bytes its tensors hold, followed through it)."""
    tally = Tally(rates, by_line=by_line)
    torch.manual_seed(0)
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_paths() if impl == "ours" else contextlib.nullcontext():
        model = build(impl, layers, case, keep).train()
        ids = torch.randint(3, 32000, (case.batch, case.seq))
        existing = list(model.parameters()) + list(model.buffers()) + [ids]
        live = LiveBytes(sum(t.untyped_storage().nbytes() for t in existing), existing) if memory else None
        with _Record(tally, live):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision == "autocast"):
                out = model(input_ids=ids, labels=ids)
            loss = out if isinstance(out, torch.Tensor) else out.loss
            tally.phase = "backward"
            if live is not None:
                live.phase = "backward"
            loss.backward()
            if live is not None:
                live.after = live.current
    return tally, live


def per_layer(one: Tally, two: Tally) -> dict:
    """What one more layer adds, by (phase, op, dtype): the two-layer step minus the one-layer step."""
    keys = set(one.ops) | set(two.ops)
    layer = {}
    for key in keys:
        a, b = one.ops.get(key), two.ops.get(key)
        diff = Op(key[1], key[0], key[2])
        for attr in ("count", "flops", "bytes", "seconds"):
            setattr(diff, attr, (getattr(b, attr) if b else 0) - (getattr(a, attr) if a else 0))
        if diff.count or diff.seconds > 1e-9:
            layer[key] = diff
    return layer


def eager_layers(impl: str, case: Case, rates: Rates, keep: bool = False, by_line: bool = False
                 ) -> tuple[Tally, dict]:
    """The one-layer step's tally and what each further layer adds (`per_layer`)."""
    one, _ = tally_step(impl, 1, case, rates, keep, by_line)
    two, _ = tally_step(impl, 2, case, rates, keep, by_line)
    return one, per_layer(one, two)


def model_total(one: Tally, layer: dict, layers: int, attr: str) -> float:
    """`attr` (seconds, flops, bytes, count) of a `layers`-layer step, from `eager_layers`."""
    return one.total(attr) + (layers - 1) * sum(getattr(op, attr) for op in layer.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="ours", choices=("ours", "gpt", "hf"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=1024, help="0: no chunking")
    p.add_argument("--layers", type=int, default=ANCHOR["num_hidden_layers"])
    p.add_argument("--keep", action="store_true", help="ours: selective recomputation off")
    p.add_argument("--precision", default="autocast", choices=("autocast", "bf16"),
                   help="bf16 autocast over float32 weights (as gpu_bench's default), or bfloat16 weights without "
                        "autocast (DeepSpeed's bf16 mode, what the trainer runs)")
    p.add_argument("--top", type=int, default=25, help="the N costliest operations of a layer")
    p.add_argument("--by-line", action="store_true", help="group a layer's operations by the source line issuing them")
    p.add_argument("--memory", action="store_true",
                   help="instead: the peak bytes of live tensors over the whole model's step (torch.cuda."
                        "max_memory_allocated's counterpart), e.g. --batch 1 --seq 16384")
    p.add_argument("--matmul-tflops", type=float, default=Rates.matmul_tflops)
    p.add_argument("--bandwidth-tbs", type=float, default=Rates.bandwidth_tbs)
    p.add_argument("--launch-us", type=float, default=Rates.launch_us)
    p.add_argument("--cpu-us-per-op", type=float, default=10.0,
                   help="eager PyTorch's host time per operation: the floor N ops x this puts on a step")
    args = p.parse_args(argv)

    rates = Rates(matmul_tflops=args.matmul_tflops, bandwidth_tbs=args.bandwidth_tbs, launch_us=args.launch_us)
    case = Case(args.impl, args.batch, args.seq, args.chunk, args.precision)
    print(f"{args.impl} {args.batch}x{args.seq}" + (f" chunk {args.chunk}" if args.chunk and args.impl != "gpt" else "")
          + (" keep" if args.keep else "") + f", {args.layers} layers, "
          + ("bf16 autocast" if args.precision == "autocast" else "bfloat16 weights") + ", one training step")
    if args.memory:
        _, live = tally_step(args.impl, args.layers, case, rates, args.keep, memory=True)
        print(f"  peak of live tensors {live.peak / 2 ** 30:.2f} GiB (in {live.peak_phase}, at {live.peak_line}; "
              f"weights, buffers and inputs included, gradients as they are made), {live.after / 2 ** 30:.2f} GiB "
              f"held after it")
        return 0
    one, layer = eager_layers(args.impl, case, rates, args.keep, args.by_line)
    layer_s = sum(op.seconds for op in layer.values())
    rest_s = one.total("seconds") - layer_s
    step_s = model_total(one, layer, args.layers, "seconds")
    kernels = model_total(one, layer, args.layers, "count")
    flops = model_total(one, layer, args.layers, "flops")
    moved = model_total(one, layer, args.layers, "bytes")
    tokens = args.batch * args.seq
    host_floor = kernels * args.cpu_us_per_op * 1e-6
    print(f"  estimated {step_s * 1e3:.1f} ms/step = {tokens / step_s:,.0f} tokens/s "
          f"(layer {layer_s * 1e3:.2f} ms x {args.layers}, embedding + loss {rest_s * 1e3:.1f} ms)")
    print(f"  {kernels:,} kernels (host floor at {args.cpu_us_per_op:g} us each: {host_floor * 1e3:.1f} ms), "
          f"{flops / 1e12:.2f} TFLOP, {moved / 2 ** 30:.1f} GiB moved")
    matmul_s = sum(op.seconds for op in layer.values() if op.flops)
    print(f"  a layer: {layer_s * 1e3:.2f} ms, of which matrix multiplies {matmul_s * 1e3:.2f} ms "
          f"({100 * matmul_s / layer_s:.0f}%), {sum(op.count for op in layer.values())} kernels, "
          f"{sum(op.bytes for op in layer.values()) / 2 ** 30:.2f} GiB moved")
    if not args.top:
        return 0
    print(f"\n  {'phase':<9} {'operation':<44} {'dtype':<9} {'kernels':>7} {'GFLOP':>8} {'MiB':>9} {'ms':>7} "
          f"{'share':>6}")
    for op in sorted(layer.values(), key=lambda o: -o.seconds)[:args.top]:
        print(f"  {op.phase:<9} {op.name:<44} {op.dtype:<9} {op.count:>7} {op.flops / 1e9:>8.1f} "
              f"{op.bytes / 2 ** 20:>9.1f} {op.seconds * 1e3:>7.3f} {100 * op.seconds / layer_s:>5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
