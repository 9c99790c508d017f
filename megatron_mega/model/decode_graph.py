"""A decoding step of MegaForCausalLM captured once as a CUDA graph and replayed for every token.

At a batch of one a decoding step is hundreds of small kernels, and eager PyTorch spends longer launching them than
the GPU spends running them (launch-bound: 45 ms a token for the 241M GPU anchor on an H200, the same at 1k and
64k context). A static cache (model/cache.py `MegaStaticCache`) gives the step fixed shapes and fixed memory, and
the step reads nothing back to the host, so the whole step can be recorded once and replayed with one launch.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_mega.model.cache import MegaStaticCache
from megatron_mega.model.derived import DerivedTensors


class CudaGraphStep:
    """`step(tokens)` runs `model(tokens, past_key_values=cache)` by replaying a CUDA graph of it; returns the
    logits (B, 1, vocab), a buffer the next replay overwrites (copy what must outlive it).

    Capturing needs eager warm-up steps first (cuBLAS's workspaces, and the coefficients and tables decoding
    memoises, model/derived.py, which the graph then reads rather than recomputes); they advance the cache, so its
    buffers are restored afterwards. The graph holds the parameters' values of its capture: after the parameters
    change, capture a new one."""

    def __init__(self, model: nn.Module, cache: MegaStaticCache, batch: int, warmup: int = 2):
        device = cache.position.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the cache on a CUDA device, not {device}")
        if warmup < 1:
            raise ValueError("capture needs at least one warm-up step (the memoised tensors are made there)")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        saved, seen = cache.snapshot(), cache.seen_tokens
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._forward()
            torch.cuda.current_stream(device).wait_stream(side)
            # what the graph reads from the memo stays alive with it: a later forward that memoises something else
            # (another length, another cache) replaces the memo's value, and its memory could be reused
            self.memoised = [derived.value for module in model.modules() for derived in vars(module).values()
                             if isinstance(derived, DerivedTensors)]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
        finally:
            cache.restore(saved, seen)  # the warm-up steps ran, and capturing counted one on the host

    def _forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.tokens, past_key_values=self.cache, use_cache=True, return_dict=True,
                              output_attentions=False, output_hidden_states=False).logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.check_room(self.model.config, tokens.shape[1])
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.seen_tokens += tokens.shape[1]  # the graph advanced the device's position, not the host's
        return self.logits
