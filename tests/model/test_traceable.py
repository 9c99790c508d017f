"""torch.compile sees a whole MEGA block as one graph (parallel.compile_blocks): no graph break from the dropout's
CPU draw, the decoding memo's context variable, the recomputed gate regions or the FFT convolution's autograd
function. A break splits the block into pieces that inductor cannot fuse across."""

import pytest
import torch

from megatron_mega.model.block import MegaBlock
from tests.helpers import tiny_config


@pytest.mark.parametrize("decoder", [True, False], ids=["causal-chunked", "bidirectional"])
def test_a_training_block_traces_to_one_graph(decoder):
    torch._dynamo.reset()
    config = tiny_config(decoder=decoder, use_chunking=decoder, chunk_size=16, dropout_prob=0.1,
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, nffn_activation_dropout_prob=0.1,
                         relative_positional_bias="rotary" if decoder else "simple")
    block = MegaBlock(config).train()
    x = torch.randn(2, 32, config.hidden_size, requires_grad=True)
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [r.reason for r in explained.break_reasons]


def test_a_compiled_block_keeps_the_float32_backward_of_its_ema_under_autocast(monkeypatch):
    """The EMA runs its products in float32 with autocast disabled, forward and backward. Compiled by
    compile_blocks and run under bfloat16 autocast, its backward keeps them in float32 (what eager autograd does):
    AOTAutograd's default would trace the backward under the forward's autocast and run them in bfloat16."""
    import torch._functorch.config
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_mega.model.block import compile_blocks

    monkeypatch.setattr(torch._functorch.config, "backward_pass_autocast", "same_as_forward")  # torch's default
    torch._dynamo.reset()

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm):
                self.dtypes.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    config = tiny_config(decoder=True, use_chunking=True, chunk_size=16)
    block = MegaBlock(config).train()
    assert compile_blocks(block) == 1
    x = torch.randn(1, 160, config.hidden_size, requires_grad=True)  # 3 EMA chunks: a scan between them
    for _ in range(2):  # the first pass compiles; the second runs the compiled kernels, seen by the dispatch mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)[0]
        with MatmulDtypes() as backward:
            out.float().sum().backward()
    assert torch.float32 in backward.dtypes and torch.bfloat16 in backward.dtypes, backward.dtypes
