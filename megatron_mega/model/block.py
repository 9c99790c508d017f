"""One MEGA layer: gated attention then the normalized FFN. The unit the pipeline partitions."""

from __future__ import annotations

from typing import Optional

import torch
import torch._functorch.config
from torch import nn

from megatron_mega.model.cache import MegaLayerCache
from megatron_mega.model.ffn import MegaNormalizedFeedForwardNetwork
from megatron_mega.model.gated_attention import MegaMovingAverageGatedAttention
from megatron_mega.model.recomputed_linear import RecomputedInputLinear


class MegaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mega_layer = MegaMovingAverageGatedAttention(config)
        self.nffn = MegaNormalizedFeedForwardNetwork(config) if config.use_normalized_ffn else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[MegaLayerCache] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[MegaLayerCache], Optional[torch.Tensor]]:
        hidden_states, new_cache, weights = self.mega_layer(
            hidden_states, mask, cache=cache, use_cache=use_cache, output_attentions=output_attentions)
        if self.nffn is not None:
            hidden_states = self.nffn(hidden_states)
        return hidden_states, new_cache, weights


def compile_blocks(model: nn.Module) -> int:
    """nn.Module.compile on every MEGA block of `model` (a plain LM or a rank's pipeline stages); the number
    compiled. In place, so parameter names, state dicts and checkpoints are those of the uncompiled model, and
    activation checkpointing (the model's own or the pipeline's) recomputes through the compiled block.

    Also sets how AOTAutograd traces a compiled region's backward to eager autograd's way (process-wide): torch's
    default ("same_as_forward") traces it under the autocast state its forward ran under, so the EMA's products,
    which forward keeps in float32 with autocast disabled, would run backward in bfloat16: gradients 3e-3 off
    instead of 2e-7 (tests/model/test_traceable.py)."""
    torch._functorch.config.backward_pass_autocast = "off"
    blocks = [module for module in model.modules() if isinstance(module, MegaBlock)]
    for block in blocks:
        block.compile()
    return len(blocks)


def set_selective_recompute(model: nn.Module, enabled: bool) -> int:
    """Whether the MEGA blocks of `model` recompute their cheap intermediates in backward (on by default): the
    attention's scores, weights and values, the activated and dropped inputs of mx_proj, h_proj and fc2, the gated
    output (model/recompute.py, model/recomputed_linear.py). On: 40% less activation memory per token at the GPU
    anchor (67.9 -> 40.9 KiB per token and layer, benchmarks/activation_memory.py) for one more query-key product
    and a few elementwise passes in backward (Megatron-LM's "selective" recomputation). The number of modules
    set."""
    modules = [m for m in model.modules() if isinstance(m, (MegaMovingAverageGatedAttention, RecomputedInputLinear))]
    for module in modules:
        module.recompute = enabled
    return len(modules)
