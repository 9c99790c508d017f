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
