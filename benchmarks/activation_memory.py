"""What one MEGA layer keeps for backward, per token: the number that bounds the trainable sequence length.

Runs one MegaBlock forward (train mode, the config's dropouts) on the CPU under bf16 autocast (as the GPU trains)
or in float32, and records every tensor autograd packs for backward (saved-tensor hooks; what backward recomputes,
model/recompute.py and model/recomputed_linear.py, shows up as its inputs), counted once per storage, parameters
excluded. It does so at two lengths, L and 2L, and splits the bytes into a part per token (the slope) and a part
per layer that does not grow with the sequence (the intercept: bf16 copies of the weights, the EMA kernel's
factors). Then it projects the whole model's activation memory for --project batch x seq: layers x (per-layer +
per-token x tokens), plus float32 weights and gradients.

The projection is a lower bound of what a GPU's peak would be: it leaves out transient buffers (the FFT's padded
copies, the attention scores of one layer), the allocator's rounding, and the logits of the loss. The CPU's
dropout keeps int64 positions of the drops (~0.8 bytes per element at p=0.1) where CUDA keeps a bool mask (1 byte).

    .venv/bin/python benchmarks/activation_memory.py                       # the GPU anchor, bf16 autocast
    .venv/bin/python benchmarks/activation_memory.py --top 25 --project 1x16384
    .venv/bin/python benchmarks/activation_memory.py --dtype float32 --hidden 256 --v 512 --z 64 --nffn 256 \\
        --chunk 128 --length 1024
    .venv/bin/python benchmarks/activation_memory.py --keep                # selective recomputation off
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_mega import MegaConfig  # noqa: E402
from megatron_mega.model.attention import ChunkedAttention  # noqa: E402
from megatron_mega.model.block import MegaBlock, set_selective_recompute  # noqa: E402


def kept_tensors(block: MegaBlock, batch: int, length: int, autocast: bool, seed: int = 0) -> dict:
    """storage pointer -> (bytes, shape, dtype) of what one forward keeps for backward (inputs and weights
    excluded)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, length, block.mega_layer.hidden_size, requires_grad=True)
    exclude = {p.untyped_storage().data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}
    kept: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            kept[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)[0]
    del out
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--z", type=int, default=256)
    p.add_argument("--v", type=int, default=2048)
    p.add_argument("--nffn", type=int, default=2048)
    p.add_argument("--ndim", type=int, default=16)
    p.add_argument("--layers", type=int, default=16, help="for the projection")
    p.add_argument("--vocab", type=int, default=32000, help="for the projection's parameter count")
    p.add_argument("--chunk", type=int, default=1024, help="0: no chunking")
    p.add_argument("--bias", default="rotary", choices=["rotary", "simple"])
    p.add_argument("--encoder", action="store_true", help="bidirectional encoder (default: causal decoder)")
    p.add_argument("--dropout", type=float, default=0.1, help="every dropout of the config")
    p.add_argument("--dtype", default="bf16-autocast", choices=["bf16-autocast", "float32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=2048, help="measured at this length and twice it")
    p.add_argument("--project", default="1x16384", help="BATCHxSEQ to project the model's activation memory for")
    p.add_argument("--top", type=int, default=0, help="list the N largest kept tensors at 2 x --length")
    p.add_argument("--keep", action="store_true",
                   help="selective recomputation off (parallel.selective_recompute=false): what plain autograd keeps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    chunked = args.chunk > 0
    if chunked and args.length % args.chunk:
        p.error(f"--length {args.length} must be a multiple of --chunk {args.chunk}")
    config = MegaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        shared_representation_size=args.z,
        intermediate_size=args.v, nffn_hidden_size=args.nffn, ema_projection_size=args.ndim,
        relative_positional_bias=args.bias, is_decoder=not args.encoder, bidirectional=args.encoder,
        use_chunking=chunked, chunk_size=args.chunk if chunked else -1,
        max_positions=args.chunk if chunked else 2 * args.length,
        dropout_prob=args.dropout, hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
        nffn_activation_dropout_prob=args.dropout)
    torch.manual_seed(0)
    block = MegaBlock(config).train()
    set_selective_recompute(block, not args.keep)
    ChunkedAttention.replay_off_cuda = True  # count what a CUDA pass keeps: its attention is replayed in backward
    autocast = args.dtype == "bf16-autocast"

    short = kept_tensors(block, args.batch, args.length, autocast)
    long = kept_tensors(block, args.batch, 2 * args.length, autocast)
    total_short, total_long = (sum(b for b, _, _ in k.values()) for k in (short, long))
    tokens = args.batch * args.length
    per_token = (total_long - total_short) / tokens
    per_layer = total_short - per_token * tokens

    print(f"config: d={args.hidden} z={args.z} v={args.v} nffn={args.nffn} N={args.ndim} "
          f"chunk={args.chunk or 'none'} "
          f"{args.bias} {'encoder' if args.encoder else 'decoder'} dropout={args.dropout} {args.dtype}, "
          f"batch {args.batch}"
          f", selective recomputation {'off' if args.keep else 'on'}")
    print(f"kept for backward by one layer: {per_token / 1024:.1f} KiB per token + "
          f"{per_layer / 2**20:.1f} MiB per layer "
          f"(measured at {args.length} and {2 * args.length} tokens: "
          f"{total_short / 2**20:.0f} / {total_long / 2**20:.0f} MiB)")

    batch, seq = (int(s) for s in args.project.lower().split("x"))
    from megatron_mega import MegaForCausalLM
    with torch.device("meta"):
        params = sum(t.numel() for t in MegaForCausalLM(config).parameters())
    activations = args.layers * (per_layer + per_token * batch * seq)
    weights = 8 * params  # float32 weights and their gradients
    print(f"projection for {batch}x{seq}, {args.layers} layers, {params / 1e6:.0f}M parameters: activations "
          f"{activations / 2**30:.1f} GiB + float32 weights and gradients {weights / 2**30:.1f} GiB = "
          f"{(activations + weights) / 2**30:.1f} GiB (a lower bound of the peak: no transient buffers)")

    if args.top:
        print(f"\nlargest kept tensors at {2 * args.length} tokens (KiB per token):")
        for nbytes, shape, dtype in sorted(long.values(), key=lambda r: -r[0])[:args.top]:
            print(f"  {nbytes / (2 * tokens) / 1024:7.2f}  {str(shape):24s} {str(dtype).replace('torch.', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
