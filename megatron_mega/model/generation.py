"""Autoregressive generation for MegaForCausalLM, with transformers' argument names.

Greedy or sampled (temperature, top-k, top-p) decoding, batched with left padding, stopping at eos. With the
cache each new token costs one step through the EMA recurrence and attention over the current chunk only.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Union

import torch

from megatron_mega.model.cache import MegaStaticCache, static_cache_size
from megatron_mega.model.decode_graph import CudaGraphStep

logger = logging.getLogger(__name__)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly ahead of each token
    remove_sorted = before >= top_p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


class MegaGenerationMixin:
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: Optional[int] = None,
        max_length: Optional[int] = None,
        do_sample: Optional[bool] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        use_cache: bool = True,
        eos_token_id: Optional[Union[int, Iterable[int]]] = None,
        pad_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        num_beams: int = 1,
        cache_implementation: str = "dynamic",
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Returns (batch, prompt + new tokens). Rows that hit eos are filled with pad_token_id afterwards.

        `cache_implementation="static"` decodes on fixed-size buffers (model/cache.py `MegaStaticCache`), the same
        tokens; with it `cuda_graph=True` (a model on a CUDA device) replays every step as one CUDA graph
        (model/decode_graph.py) instead of launching its kernels one by one, captured for this call after two
        warm-up steps (for 3 steps or fewer the steps run eagerly)."""
        config = self.config
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        static = use_cache and cache_implementation == "static"
        if cuda_graph and not static:
            raise ValueError("cuda_graph=True needs cache_implementation='static' (and use_cache=True)")
        if cuda_graph and input_ids.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {input_ids.device}")
        if not config.is_decoder:
            raise ValueError("generate() needs a decoder: is_decoder=True and bidirectional=False")
        if num_beams != 1:
            raise ValueError("beam search is not implemented; use num_beams=1 (greedy or sampling)")
        do_sample = config.do_sample if do_sample is None else do_sample
        temperature = config.temperature if temperature is None else temperature
        top_k = config.top_k if top_k is None else top_k
        top_p = config.top_p if top_p is None else top_p
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        prompt_length = input_ids.shape[1]
        if max_new_tokens is None:
            max_new_tokens = (config.max_length if max_length is None else max_length) - prompt_length
        if max_new_tokens <= 0:
            return input_ids
        if eos_token_id is None:
            eos_token_id = config.eos_token_id
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                           dtype=input_ids.dtype, device=input_ids.device)
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else (
                int(eos[0]) if eos.numel() else 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif bool((attention_mask[:, -1] == 0).any()):
            logger.warning("right padding detected in a decoder prompt: pad on the left for correct generation")

        was_training = self.training
        self.eval()
        try:
            sequences = input_ids
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            out = self(input_ids, attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=1)
            cache = out.past_key_values if use_cache else None
            graph = None
            if static:
                cache = MegaStaticCache.from_cache(cache, static_cache_size(config, prompt_length + max_new_tokens))
                if cuda_graph and max_new_tokens - 1 > 3:  # the steps after the prefill's token, past the warm-up
                    graph = CudaGraphStep(self, cache, input_ids.shape[0])
            for step in range(max_new_tokens):
                logits = out.logits[:, -1, :].float()
                if do_sample:
                    logits = logits / temperature
                    if top_k and top_k > 0:
                        logits = _top_k_filter(logits, top_k)
                    if top_p is not None and top_p < 1.0:
                        logits = _top_p_filter(logits, top_p)
                    next_tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
                else:
                    next_tokens = logits.argmax(dim=-1)
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
                sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
                if eos.numel():
                    finished = finished | torch.isin(next_tokens, eos)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                if graph is not None:
                    out.logits = graph.step(next_tokens[:, None])
                elif static:
                    # the new tokens are real (a finished row's pad is fed as a token, as with the dynamic cache):
                    # no mask, so that the step reads nothing back to the host
                    out = self(next_tokens[:, None], past_key_values=cache, use_cache=True)
                elif use_cache:
                    out = self(next_tokens[:, None], attention_mask=attention_mask, past_key_values=cache,
                               use_cache=True)
                    cache = out.past_key_values
                else:
                    out = self(sequences, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
            return sequences
        finally:
            self.train(was_training)
